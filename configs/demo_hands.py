"""The hand protocol end to end on a generated hand set: no download, about 6 minutes on a 2-core CPU.

  python run.py --config configs/demo_hands.py --workdir runs/demo_hands

The reduced LAGA-Net, losses and optimiser of `configs/demo.py`, with the hand settings of
`configs/hands.py` (the 11k configs): hand augmentation (jitter first, no random erasing), one validation
image per training identity held out, the checkpoint with the best validation accuracy evaluated, and the
mean over 10 seeded query/gallery draws, each query set meeting the combined gallery of all four aspects.
The dataset (11k Hands layout: `HandInfo.csv` + `Hands/`, four aspects, photos with accessories left out)
is generated into `data.root` on first use; `--config.data.options.aspect="palmar left"` picks another aspect.
"""

from configs import demo, hands


def get_config():
  config = demo.get_config()  # the reduced model, its losses and optimiser
  hand = hands.get_hand_config("demo_hands", "data/demo_hands")
  config.data = hand.data
  config.data.image_size = (64, 64)
  config.data.resize_size = (72, 72)
  config.train.select_best = hand.train.select_best
  config.eval.num_draws = hand.eval.num_draws
  # About 180 training photos: an epoch of floor(180 / 20) = 9 batches is short, so each of the demo's
  # 15 epochs (and validations) runs 16 P x K batches.
  config.train.steps_per_epoch = 16
  return config
