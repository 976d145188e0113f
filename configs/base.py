"""Shared defaults for every config: LAGA-Net's numbers on the body datasets (paper §IV-B, docs/fidelity.md).

Dataset files import this and override a few fields, e.g. `configs/market.py`.
Launch: `python run.py --config configs/market.py --workdir runs/market --config.data.root=/data/Market-1501`.
"""

import ml_collections

from laga_jax.models import laga_net


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- model: config.model.name picks a module of laga_jax/models/ (registry in its __init__.py); the other
  # fields are that model's own (LAGA-Net's: laga_jax/models/laga_net.py `default_config`).
  c.model = laga_net.default_config()

  # --- data (data_pipelines/) ---
  c.data = ml_collections.ConfigDict()
  c.data.name = "market1501"         # see data_pipelines.datasets.DATASETS
  c.data.root = ""                   # dataset folder (original download layout)
  # Where the encoded images are read: "files" under data.root, or "tfds", the TFRecords that
  # `python -m data_pipelines.tfds --config <name>` prepared under data.tfds_dir (equal batches either way).
  c.data.source = "files"
  c.data.tfds_dir = ""               # TFDS data_dir of source "tfds" ("" = ~/tensorflow_datasets), any tf.io path
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
  c.data.num_parallel_calls = -1     # tf.data map parallelism; -1: one per CPU core, at most 16
  c.data.bad_images = "stop"         # images that do not decode: "stop" before training, naming them; "skip" them

  # --- losses (laga_jax/losses.py): each term by name, weight 0 leaves it out, summed over the model's heads ---
  c.loss = ml_collections.ConfigDict()
  c.loss.head_reduction = "sum"      # "sum" over heads (LAGA-Net eq. 8) or "mean"
  c.loss.ce = ml_collections.ConfigDict()
  c.loss.ce.weight = 1.0
  c.loss.ce.label_smoothing = 0.1
  c.loss.triplet = ml_collections.ConfigDict()
  c.loss.triplet.weight = 0.1        # beta of eq. (8); 0 = the author's CE-only training
  c.loss.triplet.margin = 1.2
  c.loss.triplet.soft = False        # soft margin log(1 + exp(d_ap - d_an)) instead of the hinge
  c.loss.triplet.normalize = False
  c.loss.triplet.feature = "post_dropout"  # a feature tap of the model (LAGA-Net: post_dropout, pre_dropout,
                                           # pre_bn, pooled)
  c.loss.center = ml_collections.ConfigDict()
  c.loss.center.weight = 0.0         # center loss (BoT): 5e-4 there
  c.loss.center.feature = "pre_bn"
  c.loss.center.lr = 0.5             # the centers' own SGD (on the unweighted loss's gradient)

  # --- optimiser (laga_jax/optim.py) ---
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"              # "adam" (coupled L2, torch.optim.Adam), "adamw", "sgd"
  c.optim.lr = 8e-4
  c.optim.schedule = "warmup_multistep"  # or "warmup_cosine" (to min_lr at the last epoch)
  c.optim.warmup_start_lr = 8e-6
  c.optim.warmup_epochs = 10
  c.optim.decay_epochs = (40, 60)
  c.optim.decay_factor = 0.5
  c.optim.min_lr = 0.0
  # Ordered (regex over "/"-joined parameter paths, LR multiplier or "frozen"); first match wins; "backbone"
  # is the model's ImageNet-pretrained part. Every parameter must match a rule, every rule a parameter.
  c.optim.param_groups = (("backbone", 0.1), (".*", 1.0))
  c.optim.weight_decay = 5e-4        # adam/sgd: coupled L2 (added to the gradient); adamw: decoupled
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9             # sgd
  c.optim.nesterov = False           # sgd

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
  # Several processes as one job (docs/distributed.md): jax.distributed.initialize() with these, where an
  # empty / -1 field is auto-detected (SLURM, Cloud TPU, Open MPI, Kubernetes).
  c.train.distributed = False
  c.train.coordinator_address = ""   # "host:port" of process 0's coordinator, e.g. "127.0.0.1:12355"
  c.train.num_processes = -1
  c.train.process_id = -1
  c.train.initialization_timeout = 300  # seconds to wait for every process to join
  c.train.max_steps = -1             # stop early after this many steps (smoke runs); -1 = no limit

  # --- evaluation (laga_jax/evaluation/) ---
  c.eval = ml_collections.ConfigDict()
  # Evaluation targets: "" = the training dataset; else comma-separated "name" or "name=root", e.g.
  # "market1501,dukemtmc=/data/DukeMTMC-reID" (cross-dataset; results.json gets a block per target).
  c.eval.datasets = ""
  c.eval.flip = True                 # add the horizontally flipped image's feature (the author's evaluation)
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

  c.mode = "train_eval"              # "train", "eval", "train_eval", "search", "maps"
  return c
