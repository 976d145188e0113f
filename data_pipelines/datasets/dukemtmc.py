"""DukeMTMC-reID (Zheng et al., ICCV 2017): 1,812 identities, 8 cameras, hand-drawn boxes."""

import re

from data_pipelines.datasets import common, market1501

PATTERN = re.compile(r"(?P<pid>\d+)_c(?P<camid>\d+)_f\d+\.jpg")
EXAMPLE = "0001_c2_f0046182.jpg"

# Table I: (ids, images) per split; the gallery's 408 extra ids are distractors with their own ids.
EXPECTED = {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)}

LAYOUT = """\
  bounding_box_train/0001_c2_f0046182.jpg ...   (16,522 images)
  query/0005_c2_f0046985.jpg ...                (2,228 images)
  bounding_box_test/0002_c1_f0044158.jpg ...    (17,661 images)
(the extracted DukeMTMC-reID/ folder; the dataset was withdrawn by its creators in 2019 and is no longer
distributed - use a copy you are licensed to use)"""


def load(root: str, eval_only: bool = False) -> common.Splits:
  """DukeMTMC-reID splits from its original download layout (the Market-1501 folder names)."""
  root = common.absolute_root(root, INFO.name)
  splits = market1501.parse_market_layout(root, INFO, PATTERN, EXAMPLE, eval_only=eval_only)
  common.check_counts(INFO.name, splits, EXPECTED)
  return splits


INFO = common.DatasetInfo(
    name="dukemtmc",
    kind="body",
    description="DukeMTMC-reID: 1,812 identities from 8 cameras (702 train / 702 test + 408 distractor ids).",
    layout=LAYOUT,
    folder="DukeMTMC-reID",
    loader=load,
)
