"""Your own images: a folder tree `<split>/<pid>/<image>` or a CSV manifest `path,pid,camid,split`.

Identities are non-negative integers (0 = distractor, as in Market-1501). Cameras matter to the body
protocol, which removes gallery images of the query's identity *and* camera from its ranking: images
with no camera all get camera 0, so give query and gallery images of the same person different cameras
(or evaluate with the hand protocol, `--config.data.kind=hand`).
"""

import csv
import logging
import os
import pathlib
import re

from data_pipelines.datasets import common

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "query", "gallery")    # val is optional: one held-out image per train identity
REQUIRED_SPLITS = ("train", "query", "gallery")
TEST_SPLITS = ("query", "gallery")                # all that evaluation reads (eval_only)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
CAMERA = re.compile(r"(?<![A-Za-z0-9])c(\d+)")   # `c3` in `0001_c3_f0100.jpg`; not the `c` of `scan01`
DEFAULT_CAMERA = 0
COLUMNS = ("path", "pid", "camid", "split")

LAYOUT = """\
  either a folder tree                           or a CSV manifest (root = the .csv file)
    train/<pid>/<image>.jpg ...                    path,pid,camid,split
    val/<pid>/<image>.jpg ...    (optional)        train/a.jpg,1,0,train
    query/<pid>/<image>.jpg ...                    probe/b.png,7,1,query
    gallery/<pid>/<image>.jpg ...                  /abs/c.jpg,7,2,gallery
  <pid>: a non-negative integer (0 = distractor); the camera is read from `c<cam>` in the file name
  (default 0); manifest paths are relative to the manifest; camid may be left empty (0)."""


def camera_of(name: str) -> int:
  """The camera written as `c<cam>` in a file name, or DEFAULT_CAMERA."""
  match = CAMERA.search(pathlib.Path(name).stem)
  return int(match[1]) if match else DEFAULT_CAMERA


def _parse_pid(text: str, where: str) -> int:
  if not text.strip().isdecimal():
    raise ValueError(f"custom: {where}: identity {text!r} is not a non-negative integer")
  return int(text)


def parse_folder_tree(root: pathlib.Path, splits_read: tuple = SPLITS) -> dict[str, list[common.Record]]:
  """Records of `root/<split>/<pid>/<image>` for each of `splits_read`; val/ is optional."""
  splits = {}
  for split in splits_read:
    split_dir = root / split
    if split == "val" and not split_dir.exists():
      continue
    common.require_dir(split_dir, root, INFO)
    records = []
    for entry in sorted(split_dir.iterdir()):
      if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"custom: image {entry} lies directly in {split_dir}; expected {split}/<pid>/<image>")
      if not entry.is_dir():
        continue
      pid = _parse_pid(entry.name, f"folder {entry}")
      records += [common.Record(os.path.join(entry, name), pid, camera_of(name))
                  for name in common.list_files(entry, IMAGE_SUFFIXES)]
    splits[split] = records
  return splits


def parse_manifest(manifest: pathlib.Path, splits_read: tuple = SPLITS) -> dict[str, list[common.Record]]:
  """Records of a CSV manifest with the header `path,pid,camid,split` (extra columns are ignored); rows of
  splits outside `splits_read` are checked for their split name only (their images need not exist)."""
  splits = {}
  with open(manifest, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"custom: {manifest} lacks the column(s) {missing}; expected the header "
                       f"{','.join(COLUMNS)} (found {reader.fieldnames})")
    for line_number, row in enumerate(reader, start=2):
      where = f"{manifest}, line {line_number}"
      if any(row[c] is None for c in COLUMNS):
        raise ValueError(f"custom: {where}: expected {len(COLUMNS)} fields {','.join(COLUMNS)}, got {row}")
      split = row["split"].strip()
      if split not in SPLITS:
        raise ValueError(f"custom: {where}: split {split!r} is not one of {list(SPLITS)}")
      if split not in splits_read:
        continue
      pid = _parse_pid(row["pid"], where)
      camid = row["camid"].strip()
      if camid and not camid.lstrip("-").isdecimal():
        raise ValueError(f"custom: {where}: camid {camid!r} is not an integer")
      path = manifest.parent / row["path"].strip()
      if not path.is_file():
        raise FileNotFoundError(f"custom: {where}: image {path} does not exist (paths are relative to "
                                f"{manifest.parent})")
      splits.setdefault(split, []).append(
          common.Record(str(path), pid, int(camid) if camid else DEFAULT_CAMERA))
  return splits


def load(root: str, eval_only: bool = False) -> common.Splits:
  """Splits of a folder tree or CSV manifest at `root`; train relabelled, val (if any) labelled alike. With
  `eval_only`, query and gallery only: train/ (and val/) may be absent."""
  root = common.absolute_root(root, INFO.name)
  read, required = (TEST_SPLITS, TEST_SPLITS) if eval_only else (SPLITS, REQUIRED_SPLITS)
  if root.is_file():
    splits, source = parse_manifest(root, read), str(root)
  else:
    common.require_dir(root, root, INFO)
    splits, source = parse_folder_tree(root, read), f"{root}/<split>/<pid>/"
  for split in required:
    if not splits.get(split):
      raise ValueError(f"custom: {source} has no {split} images; expected at least one per split "
                       f"{list(required)}")
  if not eval_only:
    splits = _label_train(splits, source)
  test = splits["query"] + splits["gallery"]
  if all(r.camid == DEFAULT_CAMERA for r in test):
    log.warning("custom: no query/gallery image names a camera, so all are camera %d; the body protocol "
                "drops same-identity same-camera gallery images, leaving no true match for any query. "
                "Name cameras (`c<cam>`) or use --config.data.kind=hand.", DEFAULT_CAMERA)
  return {split: splits[split] for split in SPLITS if split in splits}


def _label_train(splits: dict, source: str) -> dict:
  """Train relabelled 0..n-1; val images take their identity's train label (and must have one)."""
  splits["train"], pid_to_label = common.relabel(splits["train"])
  if "val" in splits:
    unknown = sorted({r.pid for r in splits["val"]} - set(pid_to_label))
    if unknown:
      raise ValueError(f"custom: {source}: val identities {unknown[:5]} have no train images; val holds "
                       "held-out images of train identities")
    splits["val"] = [common.Record(r.path, r.pid, r.camid, pid_to_label[r.pid]) for r in splits["val"]]
  return splits


INFO = common.DatasetInfo(
    name="custom",
    kind="body",
    description="Your own images: a <split>/<pid>/<image> folder tree or a path,pid,camid,split CSV manifest.",
    layout=LAYOUT,
    folder="custom",
    loader=load,
)
