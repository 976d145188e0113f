"""MBA-Net (the LAGA-Net paper's ref. [39]) with its reference code's training recipe, on any dataset.

  python run.py --config configs/mba.py:11k_dorsal_right --workdir runs/mba_11k_dr --config.data.root=data/11k
  python run.py --config configs/mba.py:hd --workdir runs/mba_hd --config.data.root=data/HD
  python run.py --config configs/mba.py --workdir runs/mba_market     # market1501, the default
  python run.py --config configs/mba.py:demo --workdir runs/mba_demo  # generated data, a few minutes on a CPU

The argument after the colon is the dataset: market1501, dukemtmc, msmt17, cuhk03_labeled, cuhk03_detected,
11k_dorsal_right, 11k_dorsal_left, 11k_palmar_right, 11k_palmar_left, hd or demo. Data fields (image size,
augmentation, evaluation protocol, best-checkpoint selection on the hand sets) come from that dataset's
config; the model, batch, loss, optimiser, schedule and epochs are MBA-Net's (nathanlem1/MBA-Net train.py):

  batch 4 (P = 4 identities x K = 1 image), label-smoothed CE (0.1) summed over the 3 heads, no triplet;
  Adam, lr 8e-4 (backbone 0.1x), coupled L2 5e-4, linear warm-up from 8e-6 over 10 epochs, x0.5 at 40 and
  60, 70 epochs; eval feature = the pooled [global, spatial, channel] vectors (6144-d), image + flip, L2.

MBA-Net was published on hand images (324 x 324) only; on body datasets this config keeps the recipe and
takes the body data settings (384 x 128) of configs/market.py & co. See docs/models.md.
"""

import importlib

import ml_collections

from laga_jax.models import mba

# dataset argument -> the config module whose data, train and eval fields it starts from.
DATASETS = {
    "market1501": "market", "dukemtmc": "duke", "msmt17": "msmt17", "cuhk03_labeled": "cuhk03_labeled",
    "cuhk03_detected": "cuhk03_detected", "11k_dorsal_right": "11k_dorsal_right",
    "11k_dorsal_left": "11k_dorsal_left", "11k_palmar_right": "11k_palmar_right",
    "11k_palmar_left": "11k_palmar_left", "hd": "hd", "demo": "demo",
}


def set_recipe(config: ml_collections.ConfigDict) -> None:
  """MBA-Net's model and its reference training recipe (train.py defaults), on top of a dataset config."""
  config.model = mba.default_config()
  # Reference: DataLoader(batch_size=4, shuffle=True), incomplete batches skipped. Our sampler draws P
  # identities x K images; K = 1 gives 4 images of 4 different identities, floor(#images / 4) batches per epoch.
  config.data.p = 4
  config.data.k = 1
  # Label-smoothed cross-entropy (eps 0.1), batch mean, summed over the three heads; no metric loss.
  config.loss.head_reduction = "sum"
  config.loss.ce.weight = 1.0
  config.loss.ce.label_smoothing = 0.1
  config.loss.triplet.weight = 0.0
  config.loss.center.weight = 0.0
  # torch.optim.Adam(weight_decay=5e-4): coupled L2; the torchvision ResNet-50 (`model.backbone`, i.e.
  # stem..layer4) at 0.1x. LR set per epoch: linear warm-up 8e-6 -> 8e-4 over 10 epochs, x0.5 at 40 and 60.
  config.optim.update(dict(
      name="adam", lr=8e-4, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8, schedule="warmup_multistep",
      warmup_epochs=10, warmup_start_lr=8e-6, decay_epochs=(40, 60), decay_factor=0.5,
      param_groups=(("backbone", 0.1), (".*", 1.0))))
  config.train.num_epochs = 70
  # Reference eval_query_gallery.py: features of the image + its horizontal flip, summed, L2-normalised.
  config.eval.flip = True


def get_config(dataset: str = "market1501") -> ml_collections.ConfigDict:
  if dataset not in DATASETS:
    raise ValueError(f"configs/mba.py:{dataset}: expected one of {', '.join(DATASETS)}")
  module = importlib.import_module(f"configs.{DATASETS[dataset]}")
  config = module.get_config("laga") if dataset == "demo" else module.get_config()
  set_recipe(config)
  if dataset == "demo":
    _demo(config)
  return config


def _demo(config: ml_collections.ConfigDict) -> None:
  """A reduced MBA-Net that learns the generated demo data in a few minutes on a 2-core CPU.

  Same code path (three branches, shared layer4, CE over three heads, Adam + warm-up + steps); one block per
  stage, base width 16, 128 x 64 images, a 256-d bottleneck. No pretrained backbone, so it learns at the
  full rate, and larger batches and a higher rate than the reference so that a few short epochs suffice.
  """
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.model.reduction_dim = 256
  config.data.p = 8
  config.data.k = 2
  config.optim.lr = 2e-3
  config.optim.param_groups = ((".*", 1.0),)
  config.optim.warmup_epochs = 1
  config.optim.decay_epochs = (10, 13)
  config.train.num_epochs = 15
  config.eval.evaluate_untrained = True
