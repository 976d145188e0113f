"""Market-1501 (Zheng et al., ICCV 2015): 1,501 identities, 6 cameras, DPM-detected boxes."""

import pathlib
import re

from data_pipelines.datasets import common

# `-1` = junk boxes (dropped, as Table I counts them), `0000` = distractors (kept, pid 0). The release
# names 24 files `*.jpg.jpg` (6 queries of id 1488 and 18 gallery boxes), so a doubled suffix is accepted.
PATTERN = re.compile(r"(?P<pid>-1|\d+)_c(?P<camid>\d+)s\d+_\d+_\d+\.jpg(?:\.jpg)?")
EXAMPLE = "0002_c1s1_000451_03.jpg"

# Table I: (ids, images) per split.
EXPECTED = {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)}

LAYOUT = """\
  bounding_box_train/0002_c1s1_000451_03.jpg ...   (12,936 images)
  query/0001_c1s1_001051_00.jpg ...                (3,368 images)
  bounding_box_test/0000_c1s1_000151_01.jpg ...    (19,732 images, incl. junk -1_*)
(the extracted Market-1501-v15.09.15/ folder of https://zheng-lab.cecs.anu.edu.au/Project/project_reid.html)"""

# Folder of each split in the Market-1501 layout (also written by DukeMTMC-reID and the demo generator).
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def parse_market_layout(root: pathlib.Path, info: common.DatasetInfo, pattern: re.Pattern, example: str, *,
                        eval_only: bool = False) -> common.Splits:
  """Train/query/gallery records of a Market-1501-style folder, train relabelled 0..n-1; with `eval_only`
  query/gallery only (bounding_box_train/ may be absent)."""
  common.require_dir(root, root, info)
  splits = {}
  for split, folder in SPLIT_FOLDERS.items():
    if eval_only and split == "train":
      continue
    path = common.require_dir(root / folder, root, info)
    splits[split] = common.parse_image_folder(path, pattern, example, info.name)
  if not eval_only:
    splits["train"], _ = common.relabel(splits["train"])
  return splits


def load(root: str, eval_only: bool = False) -> common.Splits:
  """Market-1501 splits from its original download layout."""
  root = common.absolute_root(root, INFO.name)
  splits = parse_market_layout(root, INFO, PATTERN, EXAMPLE, eval_only=eval_only)
  common.check_counts(INFO.name, splits, EXPECTED)
  return splits


INFO = common.DatasetInfo(
    name="market1501",
    kind="body",
    description="Market-1501: 1,501 identities from 6 cameras (751 train / 750 test + distractors).",
    layout=LAYOUT,
    folder="Market-1501-v15.09.15",
    loader=load,
)
