"""11k Hands (Afifi, 2019): 190 subjects; four sub-datasets by hand side, split as in MBA-Net/LAGA-Net.

Per aspect (rows without accessories only): ids sorted numerically, the first ceil(n/2) train; one
image per train id held out for validation; per test id one gallery image, the rest query, for seeded
draws 0..9. Every query set is matched against the 290-image gallery that joins all four aspects'
galleries of the same draw, the other aspects' ids offset so that they act as distractors.
"""

import csv
import dataclasses
import functools
import os
import pathlib

from data_pipelines.datasets import common

ASPECTS = ("dorsal right", "dorsal left", "palmar right", "palmar left")
COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")

# Offsets of the other aspects' ids in an aspect's combined gallery (MBA-Net,
# prepare_train_val_test_11k_r_l.py); the largest raw id is 9,000,000, so no offset id collides.
GALLERY_ID_OFFSETS = {
    "dorsal right": {"dorsal left": 11_000_000, "palmar right": 21_000_000, "palmar left": 31_000_000},
    "dorsal left": {"dorsal right": 11_000_000, "palmar right": 21_000_000, "palmar left": 31_000_000},
    "palmar right": {"dorsal left": 11_000_000, "dorsal right": 21_000_000, "palmar left": 31_000_000},
    "palmar left": {"palmar right": 11_000_000, "dorsal right": 21_000_000, "dorsal left": 31_000_000},
}

# Table II: (ids, images); "train" counts train + val, as the table does.
EXPECTED = {
    "dorsal right": {"train": (72, 962), "query": (71, 971)},
    "dorsal left": {"train": (73, 808), "query": (73, 988)},
    "palmar right": {"train": (72, 977), "query": (71, 917)},
    "palmar left": {"train": (76, 1004), "query": (75, 948)},
}
EXPECTED_COMBINED_GALLERY = (290, 290)

LAYOUT = """\
  HandInfo.csv                 (metadata: id, age, ..., accessories, ..., aspectOfHand, imageName, ...)
  Hands/Hand_0000002.jpg ...   (11,076 images, 1600 x 1200)
(the 11k Hands dataset, https://sites.google.com/view/11khands: Hands.zip extracted beside HandInfo.csv)"""


@dataclasses.dataclass(frozen=True)
class HandRow:
  """One image of HandInfo.csv: identity, accessories flag, hand side and file name."""
  pid: int
  accessories: int
  aspect: str
  image_name: str


def read_hand_info(path: pathlib.Path) -> list[HandRow]:
  """Rows of HandInfo.csv; ids are stripped first (one row's id is '1200000 ', with a trailing space)."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"11k: {path} lacks the column(s) {missing}; expected a header with {list(COLUMNS)} "
                       f"(found {reader.fieldnames})")
    rows = []
    for line_number, row in enumerate(reader, start=2):
      try:
        rows.append(HandRow(int(row["id"].strip()), int(row["accessories"]), row["aspectOfHand"].strip(),
                            row["imageName"].strip()))
      except (ValueError, AttributeError) as error:
        raise ValueError(f"11k: {path}, line {line_number}: expected an integer id and accessories flag, "
                         f"got id={row['id']!r}, accessories={row['accessories']!r}") from error
  return rows


def split_identities(rows: list[HandRow], aspect: str,
                     image_dir: pathlib.Path) -> tuple[list[common.Record], list[common.Record]]:
  """(train + val, test) records of one aspect: rows without accessories, the first ceil(n/2) ids train."""
  kept = [r for r in rows if r.aspect == aspect and r.accessories == 0]
  ids = sorted({r.pid for r in kept})
  train_ids = set(ids[:(len(ids) + 1) // 2])
  records = [common.Record(os.path.join(image_dir, r.image_name), r.pid, -1) for r in kept]
  return [r for r in records if r.pid in train_ids], [r for r in records if r.pid not in train_ids]


def load(root: str, aspect: str, draw: int = 0, seed: int = 0, images_dir: str = "Hands",
         info_file: str = "HandInfo.csv", combined_gallery: bool = True, eval_only: bool = False) -> common.Splits:
  """Train/val/query/gallery of one 11k aspect for Monte-Carlo `draw`; val does not depend on the draw."""
  return load_layout(root, aspect, INFOS[aspect], draw=draw, seed=seed, images_dir=images_dir,
                     info_file=info_file, combined_gallery=combined_gallery, check_counts=True,
                     eval_only=eval_only)


def load_layout(root: str, aspect: str, info: common.DatasetInfo, *, draw: int, seed: int, images_dir: str,
                info_file: str, combined_gallery: bool, check_counts: bool, eval_only: bool = False) -> common.Splits:
  """The 11k split of any folder in the 11k layout (the demo hand set too); `check_counts` warns when the
  counts differ from Table II. With `eval_only`, query and gallery only: the identity split still reads the
  whole HandInfo.csv, but the training images need not exist."""
  if aspect not in ASPECTS:
    raise ValueError(f"{info.name}: aspect {aspect!r} is not one of {', '.join(map(repr, ASPECTS))}")
  if draw < 0 or seed < 0:
    raise ValueError(f"{info.name}: options draw and seed must be non-negative, got draw={draw}, seed={seed}")
  root = common.absolute_root(root, info.name)
  common.require_dir(root, root, info)
  info_path = common.require_file(root / info_file, root, info)
  image_dir = common.require_dir(root / images_dir, root, info)
  rows = read_hand_info(info_path)
  key = ASPECTS.index(aspect)
  train_all, test = split_identities(rows, aspect, image_dir)
  gallery, query = common.draw_gallery(test, seed, draw, key)
  if combined_gallery:
    for other, offset in GALLERY_ID_OFFSETS[aspect].items():
      _, other_test = split_identities(rows, other, image_dir)
      other_gallery, _ = common.draw_gallery(other_test, seed, draw, ASPECTS.index(other))
      gallery += [dataclasses.replace(r, pid=r.pid + offset) for r in other_gallery]
  splits = {"query": query, "gallery": gallery}
  if not eval_only:
    train, val = common.hold_out_val(train_all, seed, key)
    splits = {"train": train, "val": val, **splits}
  common.require_images([r for records in splits.values() for r in records], info.name,
                        f"{info_path} (images expected in {image_dir})")
  if check_counts:
    expected = dict(EXPECTED[aspect])
    if combined_gallery:
      expected["gallery"] = EXPECTED_COMBINED_GALLERY
    counted = {"query": query, "gallery": gallery}
    if not eval_only:
      counted["train"] = splits["train"] + splits["val"]
    common.check_counts(info.name, counted, expected)
  return splits


INFOS = {
    aspect: common.DatasetInfo(
        name="11k_" + aspect.replace(" ", "_"),
        kind="hand",
        description=f"11k Hands, {aspect} images without accessories: {EXPECTED[aspect]['train'][0]} train / "
                    f"{EXPECTED[aspect]['query'][0]} test subjects; queries meet the 290-image gallery of all "
                    "four aspects.",
        layout=LAYOUT,
        folder="11k",
        loader=functools.partial(load, aspect=aspect),
        options={"draw": 0, "seed": 0, "images_dir": "Hands", "info_file": "HandInfo.csv",
                 "combined_gallery": True},
    )
    for aspect in ASPECTS
}
