"""LAGA-Net on Market-1501 (paper defaults, Section IV-B; Table III/IV row).

  python run.py --config configs/market.py --workdir runs/market --config.data.root=data/Market-1501-v15.09.15
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "market1501"
  config.data.root = "data/Market-1501-v15.09.15"
  return config
