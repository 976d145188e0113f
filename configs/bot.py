"""BoT (Luo et al., "Bag of Tricks and a Strong Baseline"; the LAGA-Net paper's ref. [7]) with its reference
code's training recipe, on any body dataset.

  python run.py --config configs/bot.py --workdir runs/bot_market            # market1501, the default
  python run.py --config configs/bot.py:dukemtmc --workdir runs/bot_duke --config.data.root=data/DukeMTMC-reID
  python run.py --config configs/bot.py:demo --workdir runs/bot_demo         # generated data, minutes on a CPU

The argument after the colon is the dataset: market1501, dukemtmc, msmt17, cuhk03_labeled, cuhk03_detected or
demo. Data roots, parser options and the evaluation protocol come from that dataset's config; the rest is
BoT's (github.com/michuanhaohao/reid-strong-baseline, configs/softmax_triplet_with_center.yml, the row
published as 94.5 / 85.9 on Market-1501 and 86.4 / 76.4 on DukeMTMC-reID):

  256 x 128 images, flip + 10-pixel translation + random erasing 0.5, no colour jitter; P = 16 identities x
  K = 4 images; label-smoothed CE (0.1) on the BNNeck's logits + batch-hard triplet (margin 0.3) on the GAP
  feature + center loss (weight 5e-4, its own SGD at lr 0.5); Adam, lr 3.5e-4 on every parameter, coupled
  L2 5e-4, warm-up over 10 epochs then x0.1 twice, 120 epochs; eval feature = the BNNeck output, cosine.

`--config.loss.center.weight=0` gives the reference's configs/softmax_triplet.yml (94.1 / 85.7 on Market).
docs/models.md lists every choice and where the reference code or this pipeline departs from the paper.
"""

import importlib

import ml_collections

from laga_jax.models import bot

# dataset argument -> the config module whose data, train and eval fields it starts from.
DATASETS = {
    "market1501": "market", "dukemtmc": "duke", "msmt17": "msmt17", "cuhk03_labeled": "cuhk03_labeled",
    "cuhk03_detected": "cuhk03_detected", "demo": "demo",
}


def loss_config() -> ml_collections.ConfigDict:
  """BoT's loss (§3.3, §3.5, §3.6): LS-CE(post-BN logits) + triplet(f_t) + 5e-4 x center(f_t), batch means."""
  loss = ml_collections.ConfigDict()
  loss.head_reduction = "sum"  # one head: sum = mean
  loss.ce = ml_collections.ConfigDict({"weight": 1.0, "label_smoothing": 0.1})
  loss.triplet = ml_collections.ConfigDict(
      {"weight": 1.0, "margin": 0.3, "soft": False, "normalize": False, "feature": "pre_bn"})
  # The reference's center loss has no 1/2 and its centers learn by SGD at lr 0.5 on the unweighted loss.
  loss.center = ml_collections.ConfigDict({"weight": 5e-4, "feature": "pre_bn", "lr": 0.5})
  return loss


def reference_schedule(lr: float, warmup_factor: float, warmup_iters: int, steps, gamma: float) -> dict:
  """The reference's `WarmupMultiStepLR(warmup_method="linear")`, stepped once per epoch, as `optim` fields.

  The reference steps its scheduler at the start of every epoch, after the constructor's own step, so epoch
  e (0-based) runs at the scheduler's epoch t = e + 1: lr x (f + (1 - f) t / W) x gamma^#{s in steps: s <= t}
  while t < W (f = warmup_factor, W = warmup_iters), the same without the warm-up factor after. In this
  project's schedule (linear from warmup_start_lr at e = 0 to lr at e = warmup_epochs, x decay_factor at each
  of decay_epochs) that is warm-up over W - 1 epochs from lr (f + (1 - f) / W) and decays at each s - 1.
  """
  if warmup_iters < 1 or any(s < warmup_iters for s in steps):
    raise ValueError(f"warmup_iters={warmup_iters}, steps={tuple(steps)}: expected no decay before the warm-up ends")
  return {"lr": lr, "schedule": "warmup_multistep", "warmup_epochs": warmup_iters - 1,
          "warmup_start_lr": lr * (warmup_factor + (1.0 - warmup_factor) / warmup_iters),
          "decay_epochs": tuple(s - 1 for s in steps), "decay_factor": gamma}


def optim_config() -> ml_collections.ConfigDict:
  """torch.optim.Adam(lr 3.5e-4, weight_decay 5e-4) and the reference's WarmupMultiStepLR, per epoch.

  BASE_LR 3.5e-4, WARMUP_FACTOR 0.01, WARMUP_ITERS 10, STEPS (40, 70), GAMMA 0.1 (`reference_schedule`):
  warm-up over 9 epochs from 0.109 lr, then lr, x0.1 from epoch 39 and x0.01 from epoch 69 (0-based). (The
  paper's eq. for the same schedule: from 3.5e-5 and decays after epochs 40 and 70.)
  """
  optim = ml_collections.ConfigDict()
  optim.name = "adam"
  optim.lr = 3.5e-4
  optim.weight_decay = 5e-4   # WEIGHT_DECAY = WEIGHT_DECAY_BIAS: every parameter, BN scales included
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.momentum = 0.9        # sgd only
  optim.nesterov = False      # sgd only
  optim.update(reference_schedule(3.5e-4, warmup_factor=0.01, warmup_iters=10, steps=(40, 70), gamma=0.1))
  optim.min_lr = 0.0          # warmup_cosine only
  # One rate for everything (BIAS_LR_FACTOR = 1, no backbone multiplier); "backbone" = bot.BACKBONE_PATTERN.
  optim.param_groups = ((".*", 1.0),)
  return optim


def get_config(dataset: str = "market1501") -> ml_collections.ConfigDict:
  if dataset not in DATASETS:
    raise ValueError(f"configs/bot.py:{dataset}: expected one of {', '.join(DATASETS)}")
  config = importlib.import_module(f"configs.{DATASETS[dataset]}").get_config()
  config.model = bot.default_config()
  config.loss = loss_config()
  config.optim = optim_config()
  # Reference transform: Resize(256, 128) -> flip 0.5 -> Pad(10) -> RandomCrop(256, 128) -> normalise ->
  # RandomErasing(0.5). The pipeline translates by resizing to (256 + 20, 128 + 20) and cropping instead
  # of padding with black (docs/models.md).
  config.data.image_size = (256, 128)
  config.data.resize_size = (276, 148)
  config.data.color_jitter = (0.0, 0.0, 0.0, 0.0)
  config.data.jitter_first = False
  config.data.erasing_p = 0.5
  config.data.p = 16          # IMS_PER_BATCH 64 / NUM_INSTANCE 4
  config.data.k = 4
  config.train.num_epochs = 120
  config.eval.flip = False    # the reference ranks the image's feature alone (TEST: no flip)
  if dataset == "demo":
    _demo(config)
  return config


def _demo(config: ml_collections.ConfigDict) -> None:
  """A reduced BoT that learns the generated demo data in a few minutes on a 2-core CPU.

  Same code path (BNNeck, LS-CE + triplet + center loss with the centers' own SGD, Adam + warm-up + steps);
  one block per stage, base width 16 (a 512-d feature), 128 x 64 images (the 10-pixel translation scaled to
  5). No pretrained backbone, so a higher rate than the reference's fine-tuning rate, smaller batches (more
  steps per epoch on 480 training images) and a short schedule.
  """
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.data.image_size = (128, 64)
  config.data.resize_size = (138, 74)
  config.data.p = 8
  config.data.k = 4
  config.optim.lr = 2e-3
  config.optim.warmup_epochs = 1
  config.optim.warmup_start_lr = 2e-4
  config.optim.decay_epochs = (15, 18)
  config.train.num_epochs = 20
  config.eval.evaluate_untrained = True
