"""A reduced LAGA-Net on the generated demo dataset: the whole job on a fresh machine, no download.

  python run.py --config configs/demo.py --workdir runs/demo

Same code path as the paper configs (all four branches, six heads, CE + triplet, P×K batches, Adam with coupled
L2, warm-up + steps), with a one-block-per-stage ResNet of base width 16 and 128×64 inputs,
so that training and evaluation finish in minutes on a 2-core CPU. The dataset (Market-1501 layout) is
generated into `data.root` on first use.
"""

import importlib

from configs import base

# Table III rows on the demo (cumulative, as configs/ablation.py on Market-1501); "laga" is the full model.
ABLATION_ROWS = {
    "global": dict(use_local=False, use_cam=False, use_sam_rpe=False),
    "local": dict(use_local=True, use_cam=False, use_sam_rpe=False),
    "cam": dict(use_local=True, use_cam=True, use_sam_rpe=False),
}


def get_config(model: str = "laga"):
  """`configs/demo.py` (LAGA-Net), `configs/demo.py:<ablation row>` or `configs/demo.py:<rival>`."""
  if model not in ("laga", *ABLATION_ROWS):
    # A rival's own demo settings live with its configs (configs/<model>.py:demo).
    try:
      module = importlib.import_module(f"configs.{model}")
    except ModuleNotFoundError:
      raise ValueError(f"configs/demo.py:{model}: expected laga, {', '.join(ABLATION_ROWS)} or a model with a "
                       f"configs/<model>.py (e.g. bot, pcb, mgn, mba)") from None
    return module.get_config("demo")
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
  config.optim.param_groups = ((".*", 1.0),)
  config.optim.warmup_epochs = 1
  config.optim.decay_epochs = (10, 13)
  config.train.num_epochs = 15
  config.train.log_every_steps = 10
  config.train.keep_checkpoints = 1
  config.eval.batch_size = 50
  config.eval.evaluate_untrained = True
  config.model.update(ABLATION_ROWS.get(model, {}))
  return config
