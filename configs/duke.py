"""LAGA-Net on DukeMTMC-reID (paper defaults, Section IV-B; Table III/IV row).

  python run.py --config configs/duke.py --workdir runs/duke --config.data.root=data/DukeMTMC-reID
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.name = "dukemtmc"
  config.data.root = "data/DukeMTMC-reID"
  return config
