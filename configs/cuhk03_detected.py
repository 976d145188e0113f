"""LAGA-Net on CUHK03-NP (detected boxes) (paper defaults, Section IV-B; Table III/IV row).

  python run.py --config configs/cuhk03_detected.py --workdir runs/cuhk03_detected --config.data.root=data/cuhk03
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "cuhk03_detected"
  config.data.root = "data/cuhk03"
  return config
