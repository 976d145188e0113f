"""HD, the Hong Kong Polytechnic University Hand Dorsal dataset (Kumar & Xu, 2016): 502 + 213 subjects.

Split as in MBA-Net/LAGA-Net: ids <= 447 train (251 ids), the other 251 test; one image per train id held
out for validation; per test id one gallery image, the rest query, for seeded draws 0..9; every image of
the 213 extra subjects (folder 502-712) joins each gallery with its id + 1000.
"""

import os
import pathlib
import re

from data_pipelines.datasets import common

LAST_TRAIN_ID = 447       # MBA-Net's prepare_train_val_test_hd.py: the 251st id of folder 1-501
EXTRA_ID_OFFSET = 1000    # keeps the extra subjects' ids apart from the test ids
NAME = re.compile(r"(?P<pid>\d+)_[^/]*\.jpg", re.IGNORECASE)
EXAMPLE = "1_1.jpg"

# Table II: (ids, images); "train" counts train + val, as the table does.
EXPECTED = {"train": (251, 2407), "query": (251, 1992), "gallery": (464, 1593)}

LAYOUT = """\
  Original Images/1-501/<id>_<k>.jpg ...     (the 502 subjects split into train and test)
  Original Images/502-712/<id>_<k>.jpg ...   (213 subjects added to every gallery)
(the extracted HD/ folder of the PolyU hand dorsal (minor knuckle) database,
http://www4.comp.polyu.edu.hk/~csajaykr/knuckleV2.htm)"""


def parse_hd_folder(folder: pathlib.Path) -> list[common.Record]:
  """Records of one HD folder; the id is the file-name prefix before the first `_` (`.jpg` in any case)."""
  records = []
  for name in common.list_files(folder, (".jpg",)):
    match = NAME.fullmatch(name)
    if match is None:
      raise ValueError(f"hd: unexpected file name {folder / name}: expected <id>_<k>.jpg, like {EXAMPLE!r}")
    records.append(common.Record(os.path.join(folder, name), int(match["pid"]), -1))
  return records


def load(root: str, draw: int = 0, seed: int = 0, images_dir: str = "Original Images",
         eval_only: bool = False) -> common.Splits:
  """Train/val/query/gallery of HD for Monte-Carlo `draw`; val does not depend on the draw. With
  `eval_only`, query and gallery only (the same folders are read: test ids share 1-501 with train)."""
  if draw < 0 or seed < 0:
    raise ValueError(f"hd: options draw and seed must be non-negative, got draw={draw}, seed={seed}")
  root = common.absolute_root(root, INFO.name)
  common.require_dir(root, root, INFO)
  subjects = parse_hd_folder(common.require_dir(root / images_dir / "1-501", root, INFO))
  extra = parse_hd_folder(common.require_dir(root / images_dir / "502-712", root, INFO))
  train_all = [r for r in subjects if r.pid <= LAST_TRAIN_ID]
  test = [r for r in subjects if r.pid > LAST_TRAIN_ID]
  gallery, query = common.draw_gallery(test, seed, draw, key=0)
  gallery += [common.Record(r.path, r.pid + EXTRA_ID_OFFSET, -1) for r in extra]
  if eval_only:
    common.check_counts(INFO.name, {"query": query, "gallery": gallery}, EXPECTED)
    return {"query": query, "gallery": gallery}
  train, val = common.hold_out_val(train_all, seed, key=0)
  common.check_counts(INFO.name, {"train": train + val, "query": query, "gallery": gallery}, EXPECTED)
  return {"train": train, "val": val, "query": query, "gallery": gallery}


INFO = common.DatasetInfo(
    name="hd",
    kind="hand",
    description="HD (PolyU hand dorsal): 251 train / 251 test subjects + 213 gallery-only subjects.",
    layout=LAYOUT,
    folder="HD",
    loader=load,
    options={"draw": 0, "seed": 0, "images_dir": "Original Images"},
)
