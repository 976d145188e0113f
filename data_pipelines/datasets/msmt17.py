"""MSMT17 (Wei et al., CVPR 2018): 4,101 identities, 15 cameras; splits from the official list files."""

import os
import pathlib
import re

from data_pipelines.datasets import common

# `0000/0000_000_01_0303morning_0015_0.jpg 0`: <pid folder>/<pid>_<index>_<camera>_<date+time>_<frame>_<n>
# [_ex].jpg and the label; about 42% of the names end in `_ex.jpg`.
LINE = re.compile(r"(?P<rel>\d+/(?P<name>\d+_\d+_(?P<camid>\d+)_[0-9a-z]+_\d+_\d+(?:_ex)?\.jpg))\s+"
                  r"(?P<pid>\d+)")
EXAMPLE_LINE = "0000/0000_000_01_0303morning_0015_0.jpg 0"

# Image folders of V1 (`train/`, `test/`) and of V2 (`mask_train_v2/`, `mask_test_v2/`), same list files.
IMAGE_FOLDERS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))

# Table I (list_train only); `merge_val=True` adds list_val's 2,373 images (32,621, the paper's text).
EXPECTED = {"train": (1041, 30248), "query": (3060, 11659), "gallery": (3060, 82161)}
EXPECTED_MERGED_TRAIN = (1041, 32621)

LAYOUT = """\
  train/0000/0000_045_12_0303morning_0006_2.jpg ...   (train + val images, one folder per id)
  test/0000/0000_000_01_0303morning_0015_0.jpg ...    (query + gallery images)
  list_train.txt  list_val.txt  list_query.txt  list_gallery.txt
(the extracted MSMT17_V1/ folder, distributed under a signed agreement: https://www.pkuvmc.com/dataset.html;
MSMT17_V2's mask_train_v2/ and mask_test_v2/ folders are accepted too)"""


def parse_list(list_path: pathlib.Path, image_dir: pathlib.Path) -> list[common.Record]:
  """Records of one list file; each line is `<pid>/<name>.jpg <label>`, relative to `image_dir`."""
  records, image_dir = [], str(image_dir)
  with open(list_path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      match = LINE.fullmatch(line.strip())
      if match is None:
        raise ValueError(f"msmt17: {list_path}, line {line_number}: expected a line like {EXAMPLE_LINE!r}, "
                         f"got {line.rstrip()!r}")
      records.append(common.Record(os.path.join(image_dir, match["rel"]), int(match["pid"]), int(match["camid"])))
  return records


def _image_folders(root: pathlib.Path, eval_only: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
  """(train, test) image folders of V1 or V2; with `eval_only` the train folder need not exist."""
  for train, test in IMAGE_FOLDERS:
    if (eval_only or (root / train).is_dir()) and (root / test).is_dir():
      return root / train, root / test
  train, test = IMAGE_FOLDERS[0]
  if not eval_only:
    common.require_dir(root / train, root, INFO)
  return root / train, common.require_dir(root / test, root, INFO)


def load(root: str, merge_val: bool = False, eval_only: bool = False) -> common.Splits:
  """MSMT17 splits; `merge_val` adds list_val to train (the paper's 32,621) instead of Table I's 30,248.
  With `eval_only`, query and gallery only (no train/ folder, list_train.txt or list_val.txt needed)."""
  root = common.absolute_root(root, INFO.name)
  common.require_dir(root, root, INFO)
  train_dir, test_dir = _image_folders(root, eval_only)
  lists = {"train": ("list_train.txt", train_dir), "query": ("list_query.txt", test_dir),
           "gallery": ("list_gallery.txt", test_dir)}
  if eval_only:
    del lists["train"]
  elif merge_val:
    lists["val"] = ("list_val.txt", train_dir)
  splits = {}
  for split, (name, image_dir) in lists.items():
    list_path = common.require_file(root / name, root, INFO)
    splits[split] = parse_list(list_path, image_dir)
    common.require_images(splits[split], INFO.name, str(list_path))
  if eval_only:
    common.check_counts(INFO.name, splits, EXPECTED)
    return splits
  if merge_val:
    splits["train"] += splits.pop("val")
  splits["train"], _ = common.relabel(splits["train"])
  expected = dict(EXPECTED, train=EXPECTED_MERGED_TRAIN) if merge_val else EXPECTED
  common.check_counts(INFO.name, splits, expected)
  return splits


INFO = common.DatasetInfo(
    name="msmt17",
    kind="body",
    description="MSMT17: 4,101 identities from 15 cameras (1,041 train / 3,060 test).",
    layout=LAYOUT,
    folder="MSMT17_V1",
    loader=load,
    options={"merge_val": False},
)
