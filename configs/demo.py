"""A reduced LAGA-Net on the generated demo dataset: the whole job on a fresh machine, no download.

  python run.py --config configs/demo.py --workdir runs/demo

Same code path as the paper configs (all four branches, six heads, CE + triplet, P×K batches, Adam with coupled
L2, warm-up + steps), with a one-block-per-stage ResNet of base width 16 and 128×64 inputs,
so that training and evaluation finish in minutes on a 2-core CPU. The dataset (Market-1501 layout) is
generated into `data.root` on first use.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "demo"
  config.data.root = "data/demo"
  config.data.image_size = (128, 64)
  config.data.resize_size = (144, 72)

  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 16
  config.model.reduction_dim = 128

  # No pretrained backbone here: it is as new as the heads, so it learns at the full rate, and the rate is
  # higher than the paper's (tuned for fine-tuning ImageNet weights) so that 15 short epochs suffice.
  config.optim.lr = 2e-3
  config.optim.backbone_lr_mult = 1.0
  config.optim.warmup_epochs = 1
  config.optim.decay_epochs = (10, 13)
  config.train.num_epochs = 15
  config.train.log_every_steps = 10
  config.train.keep_checkpoints = 1
  config.eval.batch_size = 50
  config.eval.evaluate_untrained = True
  return config
