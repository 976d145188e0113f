"""Shared defaults for every LAGA-Net config: the numbers of SPEC.md (body datasets).

Dataset files import this and override a few fields, e.g. `configs/market.py`.
Launch: `python run.py --config configs/market.py --workdir runs/market --config.data.root=/data/Market-1501`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- model (laga_jax/models/laga_net.py) ---
  c.model = ml_collections.ConfigDict()
  c.model.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3)
  c.model.stage_sizes = ()           # overrides depth when non-empty (tests: (1, 1, 1, 1))
  c.model.width = 64                 # base width of the ResNet (64 = torchvision)
  c.model.last_stride = 1            # layer4 stride: 1 (LAGA-Net) or 2 (torchvision)
  c.model.use_local = True           # local branch (Table III "+Local")
  c.model.num_stripes = 3            # horizontal stripes of the local branch
  c.model.use_cam = True             # CAM in the channel branch (Table III "+CAM")
  c.model.use_sam_rpe = True         # SAM-RPE in the spatial branch (Table III "+SAM-RPE")
  c.model.shared_layer4 = False      # False: 4 independent layer4 copies (paper); True: one shared (author code)
  c.model.reduction_dim = 1024       # head bottleneck width (paper 1024; author code 2048)
  c.model.dropout = 0.5
  c.model.leaky_slope = 0.1
  c.model.cam_energy = "author"      # "author": softmax(-XX^T); "paper": softmax(+XX^T)
  c.model.rpe = "diagonal"           # "diagonal" (author/SPEC), "axial", "none"
  c.model.dtype = "float32"          # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.model.pretrained = ""            # torchvision ResNet50 weights: .pth / .safetensors / .npz ("" = random init)

  # --- data (data_pipelines/) ---
  c.data = ml_collections.ConfigDict()
  c.data.name = "market1501"         # see data_pipelines.datasets.DATASETS
  c.data.root = ""                   # dataset folder (original download layout)
  c.data.options = ml_collections.ConfigDict()  # parser options, e.g. {"draw": 0} for hand sets
  c.data.kind = "body"               # "body" or "hand" (selects augmentation and evaluation protocol)
  c.data.image_size = (384, 128)     # (height, width) fed to the network
  c.data.resize_size = (432, 144)    # train resize before the random crop (9/8 of image_size)
  c.data.color_jitter = (0.1, 0.1, 0.1, 0.0)  # brightness, contrast, saturation, hue
  c.data.jitter_first = False        # hands: jitter before resize (author code order)
  c.data.erasing_p = 0.5             # random erasing probability (hands: 0)
  c.data.p = 5                       # identities per batch
  c.data.k = 4                       # images per identity
  c.data.cache_decoded = False       # keep decoded images in memory (small sets)
  c.data.num_parallel_calls = -1     # tf.data AUTOTUNE

  # --- loss (laga_jax/losses.py) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.1
  c.loss.triplet_beta = 0.1          # 0 = the author's CE-only training
  c.loss.triplet_margin = 1.2
  c.loss.triplet_normalize = False
  c.loss.triplet_feature = "embedding"  # "embedding" (reduction output) or "pooled" (2048-d, pre-reduction)

  # --- optimiser (laga_jax/optim.py) ---
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 8e-4
  c.optim.warmup_start_lr = 8e-6
  c.optim.warmup_epochs = 10
  c.optim.decay_epochs = (40, 60)
  c.optim.decay_factor = 0.5
  c.optim.backbone_lr_mult = 0.1
  c.optim.weight_decay = 5e-4        # coupled L2 (added to the gradient before Adam)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8

  # --- training loop (laga_jax/train.py) ---
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 70
  c.train.steps_per_epoch = -1       # -1: floor(train images / (P*K))
  c.train.seed = 42
  c.train.parallel = "shard_map"     # "shard_map" (jit + shard_map) or "pmap"
  c.train.num_devices = -1           # -1: all local devices
  c.train.log_every_steps = 50
  c.train.checkpoint_every_epochs = 1
  c.train.keep_checkpoints = 2       # latest N kept (plus the best, for hand sets)
  c.train.select_best = False        # hands: evaluate the checkpoint with the best val accuracy
  c.train.distributed = False        # call jax.distributed.initialize() (multi-host)
  c.train.max_steps = -1             # stop early after this many steps (smoke runs); -1 = no limit

  # --- evaluation (laga_jax/evaluation/) ---
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_rank = 50
  c.eval.query_chunk = 512
  c.eval.rerank = False
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  c.eval.num_draws = 1               # hands: 10 seeded query/gallery draws
  c.eval.num_figures = 4             # ranked-result pictures written after evaluation
  c.eval.figure_topk = 10
  c.eval.save_features = True
  c.eval.evaluate_untrained = False  # also evaluate the model before training (demo)

  c.mode = "train_eval"              # "train", "eval", "train_eval", "search"
  return c
