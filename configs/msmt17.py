"""LAGA-Net on MSMT17 (V1) (paper defaults, Section IV-B; Table III/IV row).

  python run.py --config configs/msmt17.py --workdir runs/msmt17 --config.data.root=data/MSMT17_V1
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "msmt17"
  config.data.root = "data/MSMT17_V1"
  config.data.options.merge_val = False  # True: train on list_train + list_val (32,621 images)
  return config
