"""PCB and PCB+RPP (Sun et al., ECCV 2018; docs/models.md) on the body datasets and the demo.

The argument picks the dataset and the training stage (paper Sec. 3.3, "induced training"):

  <dataset>                PCB (steps 1-2): uniform parts, 60 epochs, SGD lr 0.1 (backbone 0.1x), /10 at 40
  <dataset>_rpp            RPP step 3: the part classifier alone (every other parameter frozen), from the PCB run
  <dataset>_rpp_finetune   RPP step 4: the whole network fine-tuned, from the step-3 run

with <dataset> one of market1501 (default), dukemtmc, msmt17, cuhk03_labeled, cuhk03_detected, demo. E.g.

  python run.py --config configs/pcb.py:market1501 --workdir runs/pcb_market1501 \
      --config.data.root=data/Market-1501-v15.09.15 --config.model.pretrained=resnet50-0676ba61.pth
  python run.py --config configs/pcb.py:market1501_rpp --workdir runs/pcb_market1501_rpp \
      --config.data.root=data/Market-1501-v15.09.15 --config.model.init_from=runs/pcb_market1501
  python run.py --config configs/pcb.py:market1501_rpp_finetune --workdir runs/pcb_market1501_rpp_finetune \
      --config.data.root=data/Market-1501-v15.09.15 --config.model.init_from=runs/pcb_market1501_rpp

`configs/demo.py:pcb` is `configs/pcb.py:demo`: a tiny PCB that learns on the generated demo set in minutes.
"""

import importlib

from configs import demo as demo_config
from laga_jax.models import pcb

# Our dataset name -> the dataset config whose data fields (name, root, options) PCB starts from.
DATASET_CONFIGS = {"market1501": "market", "dukemtmc": "duke", "msmt17": "msmt17",
                   "cuhk03_labeled": "cuhk03_labeled", "cuhk03_detected": "cuhk03_detected"}
STAGES = ("", "_rpp", "_rpp_finetune")
# The RPP stages read the previous stage's workdir; these defaults follow the launch lines above.
PREVIOUS_WORKDIR = {"_rpp": "runs/pcb_{}", "_rpp_finetune": "runs/pcb_{}_rpp"}


def _split(arg: str):
  for stage in sorted(STAGES, key=len, reverse=True):
    dataset = arg[:len(arg) - len(stage)] if stage else arg
    if arg.endswith(stage) and (dataset in DATASET_CONFIGS or dataset == "demo"):
      return dataset, stage
  choices = ", ".join(list(DATASET_CONFIGS) + ["demo"])
  raise ValueError(f"configs/pcb.py:{arg}: expected <dataset>, <dataset>_rpp or <dataset>_rpp_finetune with "
                   f"<dataset> one of {choices}")


def _pcb_training(config) -> None:
  """The paper's PCB recipe (Sec. 4.2; the authors' PCB.py): CE on each part, SGD, flips only."""
  # 384 x 128 inputs, resized without a crop; random horizontal flip is the only augmentation.
  config.data.image_size = (384, 128)
  config.data.resize_size = (384, 128)
  config.data.color_jitter = (0.0, 0.0, 0.0, 0.0)
  config.data.erasing_p = 0.0
  config.data.p = 16                      # 64 images per batch (the paper's batch size) as 16 ids x 4
  config.data.k = 4

  # One softmax cross-entropy per part, summed (the authors back-propagate the six losses together).
  config.loss.head_reduction = "sum"
  config.loss.ce.weight = 1.0
  config.loss.ce.label_smoothing = 0.0
  config.loss.triplet.weight = 0.0
  config.loss.triplet.feature = "reduced"
  config.loss.center.weight = 0.0
  config.loss.center.feature = "reduced"

  # SGD (momentum 0.9, Nesterov and L2 5e-4 as in the authors' PCB.py), lr 0.1, /10 after 40 of 60 epochs; the
  # ImageNet backbone at 0.1x.
  config.optim.name = "sgd"
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "warmup_multistep"
  config.optim.warmup_epochs = 0
  config.optim.warmup_start_lr = 0.0
  config.optim.decay_epochs = (40,)
  config.optim.decay_factor = 0.1
  config.optim.param_groups = (("backbone", 0.1), (".*", 1.0))
  config.train.num_epochs = 60
  config.eval.flip = False                # the authors' test code ranks the image's features alone


def _rpp_stage(config, stage: str, dataset: str) -> None:
  """Sec. 3.3 steps 3-4: RPP replaces the stripes, each step from the previous stage's workdir; lr 0.01 for 10
  epochs each (our reading of Sec. 4.2; the authors' RPP.py trains one joint stage instead: docs/models.md)."""
  config.model.rpp = True
  config.model.init_from = PREVIOUS_WORKDIR[stage].format(dataset)
  config.optim.lr = 0.01
  config.optim.decay_epochs = ()
  config.train.num_epochs = 10
  if stage == "_rpp":
    # Step 3: the part classifier is the only trained layer; everything PCB learned stays fixed.
    config.optim.param_groups = ((r"^rpp/", 1.0), (".*", "frozen"))


def get_config(arg: str = "market1501"):
  dataset, stage = _split(arg)
  if dataset == "demo":
    config = demo_config.get_config()   # the demo's data, training-loop and evaluation settings
  else:
    config = importlib.import_module(f"configs.{DATASET_CONFIGS[dataset]}").get_config()
  pretrained = config.model.get("pretrained", "")
  config.model = pcb.default_config()
  config.model.pretrained = pretrained
  _pcb_training(config)
  if dataset == "demo":
    _demo(config)
  if stage:
    _rpp_stage(config, stage, dataset)
    if dataset == "demo":
      config.train.num_epochs = 5
  return config


def _demo(config) -> None:
  """A tiny PCB (1 block per stage, width 16) on the 128 x 64 demo images, trained from scratch in minutes."""
  config.data.image_size = (128, 64)     # layer4: 8 x 4 rows x columns; the 6 part windows overlap (3 rows)
  config.data.resize_size = (128, 64)
  config.data.p = 5
  config.data.k = 4
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  # No ImageNet backbone: it learns at the full rate.
  config.optim.param_groups = ((".*", 1.0),)
  config.optim.lr = 0.05
  config.optim.decay_epochs = (10,)
  config.train.num_epochs = 15
