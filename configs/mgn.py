"""MGN (Wang et al. 2018, the LAGA-Net paper's ref. [10]) with its reference code's recipe, on every body set.

  python run.py --config configs/mgn.py --workdir runs/mgn_market --config.data.root=data/Market-1501-v15.09.15
  python run.py --config configs/mgn.py:dukemtmc --workdir runs/mgn_duke      (msmt17, cuhk03_labeled,
  python run.py --config configs/mgn.py:demo --workdir runs/mgn_demo           cuhk03_detected likewise)

The recipe is the one behind the published result of the reference implementation (seathiefwang/MGN-pytorch,
README "last" row = the last command of its demo.sh): 384x128 inputs resized without cropping, flip and random
erasing, 16 identities x 4 images, CE + 2 x batch-hard triplet (margin 1.2) on the three whole-map features,
each averaged over its heads, Adam (lr 2e-4, coupled L2 5e-4) for 400 nominal epochs with x0.1 steps at 320
and 380. docs/models.md lists each choice and where the paper differs (SGD, 80 epochs, max pooling).
"""

import importlib
import math

from laga_jax.models import mgn

# dataset name (`config.data.name`) -> the config module of its data fields.
DATASET_CONFIGS = {"market1501": "market", "dukemtmc": "duke", "msmt17": "msmt17",
                   "cuhk03_labeled": "cuhk03_labeled", "cuhk03_detected": "cuhk03_detected"}
# Identities of each training split. The reference's sampler makes one epoch a pass over the identities,
# ceil(identities / 16) batches of 16 x 4 images (the last one shorter), not a pass over the images.
TRAIN_IDENTITIES = {"market1501": 751, "dukemtmc": 702, "msmt17": 1041, "cuhk03_labeled": 767,
                    "cuhk03_detected": 767}


def _mgn_recipe(config):
  """The reference's model, losses and optimiser on top of a dataset config (data fields kept)."""
  config.model = mgn.default_config()

  config.loss.head_reduction = "mean"     # the reference averages each loss over its heads
  config.loss.ce.weight = 1.0             # over the 8 classifiers
  config.loss.ce.label_smoothing = 0.0    # plain nn.CrossEntropyLoss
  config.loss.triplet.weight = 2.0        # `--loss 1*CrossEntropy+2*Triplet`
  config.loss.triplet.margin = 1.2
  config.loss.triplet.soft = False
  config.loss.triplet.normalize = False
  config.loss.triplet.feature = "global"  # the three 256-d whole-map features (fg_p1, fg_p2, fg_p3)
  config.loss.center.weight = 0.0

  config.optim.name = "adam"              # torch.optim.Adam: L2 coupled into the gradient
  config.optim.lr = 2e-4
  config.optim.weight_decay = 5e-4        # on every parameter, BN and biases included
  config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
  config.optim.param_groups = ((".*", 1.0),)  # one rate for the pretrained and the new layers
  config.optim.schedule = "warmup_multistep"
  config.optim.warmup_epochs = 0          # no warm-up
  config.optim.decay_factor = 0.1
  # `--epochs 400 --decay_type step_320_380`: the reference steps its scheduler before each epoch and stops
  # when the scheduler reaches 400, so it trains 399 epochs and its 320th and 380th (0-based 319, 379) run
  # at the decayed rates.
  config.optim.decay_epochs = (319, 379)
  config.train.num_epochs = 399
  return config


def get_config(arg: str = "market1501"):
  """`configs/mgn.py:<dataset>`: one of market1501 (default), dukemtmc, msmt17, cuhk03_labeled,
  cuhk03_detected, or demo."""
  if arg == "demo":
    return _demo_config()
  if arg not in DATASET_CONFIGS:
    raise ValueError(f"configs/mgn.py:{arg}: expected one of {', '.join(DATASET_CONFIGS)} or demo")
  config = importlib.import_module(f"configs.{DATASET_CONFIGS[arg]}").get_config()
  config = _mgn_recipe(config)

  # Reference transforms: Resize(384, 128) (no crop), horizontal flip, random erasing (p 0.5, zero fill in
  # normalised space), no colour jitter.
  config.data.image_size = (384, 128)
  config.data.resize_size = (384, 128)    # = image_size: the random crop keeps the whole image
  config.data.color_jitter = (0.0, 0.0, 0.0, 0.0)
  config.data.erasing_p = 0.5
  config.data.p = 16                      # `--batchid 16`
  config.data.k = 4                       # `--batchimage 4`
  config.train.steps_per_epoch = math.ceil(TRAIN_IDENTITIES[arg] / config.data.p)
  config.eval.rerank = False              # the published numbers are without re-ranking
  return config


def _demo_config():
  """A tiny MGN on the generated demo dataset (configs/demo.py's data, schedule length and evaluation)."""
  demo = importlib.import_module("configs.demo")
  config = _mgn_recipe(demo.get_config())
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.model.reduction_dim = 64
  # From scratch, as the LAGA-Net demo: a higher rate than the reference's fine-tuning one, a short schedule.
  config.optim.lr = 2e-3
  config.optim.warmup_epochs = 1
  config.optim.warmup_start_lr = 2e-4
  config.optim.decay_epochs = (10, 13)
  config.train.num_epochs = 15
  return config
