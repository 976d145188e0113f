"""LAGA-Net on 11k Hands, palmar right subset (Table V).

  python run.py --config configs/11k_palmar_right.py --workdir runs/11k_palmar_right --config.data.root=data/11k
"""

from configs import hands


def get_config():
  return hands.get_hand_config("11k_palmar_right", "data/11k")
