"""Shared settings of the hand datasets (11k, HD): paper Section IV-B (hands) and the hand protocol.

Not a config on its own: `configs/11k_*.py` and `configs/hd.py` call `get_hand_config(name, root)`.
"""

from configs import base


def get_hand_config(name: str, root: str):
  config = base.get_config()
  config.data.name = name
  config.data.root = root
  config.data.kind = "hand"
  config.data.image_size = (324, 324)
  config.data.resize_size = (356, 356)
  config.data.color_jitter = (0.1, 0.1, 0.1, 0.0)
  config.data.jitter_first = True          # the author's hand transform jitters the PIL image first
  config.data.erasing_p = 0.0
  config.data.options.draw = 0             # query/gallery draw used for training-time bookkeeping
  config.train.select_best = True          # evaluate the checkpoint with the best validation accuracy
  config.eval.num_draws = 10               # mean over 10 seeded query/gallery draws
  return config
