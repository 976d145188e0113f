"""LAGA-Net on CUHK03-NP (labeled boxes) (paper defaults, Section IV-B; Table III/IV row).

  python run.py --config configs/cuhk03_labeled.py --workdir runs/cuhk03_labeled --config.data.root=data/cuhk03
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "cuhk03_labeled"
  config.data.root = "data/cuhk03"
  return config
