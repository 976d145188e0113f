"""LAGA-Net on the HD hand-dorsal dataset (Kumar & Xu, PolyU) (Table V).

  python run.py --config configs/hd.py --workdir runs/hd --config.data.root=data/HD
"""

from configs import hands


def get_config():
  return hands.get_hand_config("hd", "data/HD")
