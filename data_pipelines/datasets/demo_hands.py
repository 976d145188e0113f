"""The synthetic demo hand set (`data_pipelines.demo_hands`): 11k Hands layout, generated on first use."""

from data_pipelines.datasets import common, hands11k

LAYOUT = """\
  HandInfo.csv                 (11k columns: id, age, ..., accessories, ..., aspectOfHand, imageName, ...)
  Hands/Hand_0000001.jpg ...   (four aspects, some photos with accessories)
  demo_hands_dataset.json      (generator parameters and counts)
(written by `python -m data_pipelines.demo_hands --root <root>`, or automatically when root has no demo data)"""


def load(root: str, aspect: str = "dorsal right", draw: int = 0, seed: int = 0,
         combined_gallery: bool = True, eval_only: bool = False) -> common.Splits:
  """The 11k split of the demo hand set for `aspect` ("dorsal right", "dorsal_left", ...); generated under
  `root` when it holds neither HandInfo.csv nor Hands/ yet."""
  from data_pipelines import demo_hands  # Deferred: PIL drawing is only needed the first time.

  root = common.absolute_root(root, INFO.name)
  if not any((root / entry).exists() for entry in (demo_hands.INFO_FILE, demo_hands.IMAGES_DIR)):
    demo_hands.generate_demo_hands(root)
  # No count check: the generator's parameters decide the counts.
  return hands11k.load_layout(root, aspect.replace("_", " "), INFO, draw=draw, seed=seed,
                              images_dir=demo_hands.IMAGES_DIR, info_file=demo_hands.INFO_FILE,
                              combined_gallery=combined_gallery, check_counts=False, eval_only=eval_only)


INFO = common.DatasetInfo(
    name="demo_hands",
    kind="hand",
    description="Synthetic demo hand set (11k Hands layout, four aspects) drawn by data_pipelines.demo_hands.",
    layout=LAYOUT,
    folder="demo_hands",
    loader=load,
    options={"aspect": "dorsal right", "draw": 0, "seed": 0, "combined_gallery": True},
)
