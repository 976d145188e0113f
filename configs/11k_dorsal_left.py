"""LAGA-Net on 11k Hands, dorsal left subset (Table V).

  python run.py --config configs/11k_dorsal_left.py --workdir runs/11k_dorsal_left --config.data.root=data/11k
"""

from configs import hands


def get_config():
  return hands.get_hand_config("11k_dorsal_left", "data/11k")
