"""CUHK03 (Li et al., CVPR 2014) under the new protocol (Zhong et al., CVPR 2017): 767 train / 700 test ids.

The new protocol's configs name PNG files (`1_001_1_01.png`) that do not ship with the dataset: they are
extracted once from the original MATLAB v7.3 release file `cuhk-03.mat` (an HDF5 file) into
`images_<variant>/`, the folder torchreid also uses.
"""

import functools
import logging
import os
import pathlib
import re

import numpy as np

from data_pipelines.datasets import common

log = logging.getLogger(__name__)

VARIANTS = ("labeled", "detected")

# <camera pair 1-5>_<person within the pair, 1-based>_<camera 1|2>_<image slot 1-10>.png
NAME = re.compile(r"(?P<campair>[1-5])_(?P<person>\d{3})_(?P<camid>[12])_(?P<slot>\d{2})\.png")
SLOTS = 10  # per person: slots 1-5 are from the pair's first camera, 6-10 from its second

# (ids, images) per split. Table I's "CUHK03 (L)" row equals the detected numbers (realdata/PROVENANCE.md).
EXPECTED = {
    "labeled": {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)},
    "detected": {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)},
}
CONFIG_KEYS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")

LAYOUT = """\
  cuhk03_release/cuhk-03.mat                 (original release, MATLAB v7.3; only read while images are missing)
  cuhk03_new_protocol_config_labeled.mat     (new protocol, CUHK03-NP: https://github.com/zhunzhong07/
  cuhk03_new_protocol_config_detected.mat     person-re-ranking/tree/master/evaluation/data/CUHK03)
  images_labeled/1_001_1_01.png ...          (written from cuhk-03.mat on first use)
  images_detected/1_001_1_01.png ...
(cuhk03_release/ is the extracted cuhk03_release.zip of https://www.ee.cuhk.edu.hk/~xgwang/CUHK_identification.html)"""


def image_name(campair: int, person: int, slot: int) -> str:
  """The new protocol's file name of one cell of cuhk-03.mat (all arguments 1-based)."""
  camera = 1 if slot <= SLOTS // 2 else 2
  return f"{campair}_{person:03d}_{camera}_{slot:02d}.png"


def _save_png(image: np.ndarray, path: pathlib.Path) -> None:
  from PIL import Image  # Deferred: PIL is only needed while extracting.

  # Write then rename, so an interrupted extraction never leaves a truncated PNG that looks complete.
  partial = path.with_name(path.name + ".partial")
  Image.fromarray(image).save(partial, format="PNG")
  os.replace(partial, path)


def extract_images(mat_path: pathlib.Path, variant: str, out_dir: pathlib.Path) -> int:
  """Writes every `variant` image of the original cuhk-03.mat as PNG into `out_dir`; returns how many.

  Layout of the MATLAB v7.3 file (HDF5, every array stored transposed): `labeled` and `detected` are cells
  of 5 camera pairs; each pair is a (persons x 10) cell of images, each image H x W x 3 uint8 (stored as
  3 x W x H); missing images are empty cells. Existing files are kept, so an interrupted run resumes.
  """
  import h5py  # Deferred: only extraction reads HDF5.

  try:
    mat = h5py.File(mat_path, "r")
  except OSError as error:
    raise ValueError(f"cuhk03: {mat_path} is not a MATLAB v7.3 (HDF5) file ({error}); expected the "
                     "original cuhk-03.mat of cuhk03_release.zip") from error
  with mat:
    if variant not in mat:
      raise ValueError(f"cuhk03: {mat_path} has no {variant!r} cell; found {sorted(mat.keys())}, expected "
                       f"{list(VARIANTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for campair, pair_ref in enumerate(np.ravel(mat[variant][()]), start=1):
      cells = mat[pair_ref][()].T
      if cells.ndim != 2 or cells.shape[1] != SLOTS:
        raise ValueError(f"cuhk03: {mat_path}: camera pair {campair} of {variant!r} is a {cells.shape} cell, "
                         f"expected (persons, {SLOTS})")
      for person, row in enumerate(cells, start=1):
        for slot, image_ref in enumerate(row, start=1):
          image = mat[image_ref]
          if image.attrs.get("MATLAB_empty", 0) or image.ndim != 3:
            continue  # no image in this slot (some persons were seen by one camera only)
          path = out_dir / image_name(campair, person, slot)
          if path.is_file():
            continue
          pixels = image[()].T
          if pixels.dtype != np.uint8 or pixels.shape[2] != 3:
            raise ValueError(f"cuhk03: {mat_path}: image {path.name} is {pixels.dtype} {pixels.shape}, "
                             "expected uint8 (H, W, 3)")
          _save_png(np.ascontiguousarray(pixels), path)
          written += 1
  return written


def read_protocol(config_path: pathlib.Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(file names, pids, cameras, 0-based indices per split) of a new-protocol config (.mat, v5)."""
  import scipy.io  # Deferred: only CUHK03 reads .mat files.

  try:
    config = scipy.io.loadmat(config_path)
  except (ValueError, OSError, TypeError, NotImplementedError) as error:  # NotImplementedError: a v7.3 file
    raise ValueError(f"cuhk03: cannot read {config_path} ({error}); expected a MATLAB v5 .mat file of the "
                     "new protocol") from error
  missing = [key for key in CONFIG_KEYS if key not in config]
  if missing:
    raise ValueError(f"cuhk03: {config_path} lacks {missing}; expected the fields {list(CONFIG_KEYS)}")
  names = [str(np.ravel(cell)[0]) for cell in np.ravel(config["filelist"])]
  for name in names:
    if NAME.fullmatch(name) is None:
      raise ValueError(f"cuhk03: {config_path}: file name {name!r} does not look like '1_001_1_01.png'")
  pids = np.ravel(config["labels"]).astype(np.int64)
  camids = np.ravel(config["camId"]).astype(np.int64)
  if not len(names) == len(pids) == len(camids):
    raise ValueError(f"cuhk03: {config_path}: filelist, labels and camId differ in length "
                     f"({len(names)}, {len(pids)}, {len(camids)})")
  indices = {}
  for split in ("train", "query", "gallery"):
    index = np.ravel(config[f"{split}_idx"]).astype(np.int64)
    if index.size and (index.min() < 1 or index.max() > len(names)):
      raise ValueError(f"cuhk03: {config_path}: {split}_idx must hold 1-based indices in 1..{len(names)}, "
                       f"got {index.min()}..{index.max()}")
    indices[split] = index - 1
  return names, pids, camids, indices


def load(root: str, variant: str, images_dir: str = "", eval_only: bool = False) -> common.Splits:
  """CUHK03 new-protocol splits of `variant` ("labeled" or "detected"), extracting images when missing.
  With `eval_only`, query and gallery only: only their images need to exist (or be extracted)."""
  info = INFOS[variant]
  root = common.absolute_root(root, info.name)
  common.require_dir(root, root, info)
  config_path = common.require_file(root / f"cuhk03_new_protocol_config_{variant}.mat", root, info)
  names, pids, camids, indices = read_protocol(config_path)
  if eval_only:
    del indices["train"]
  image_dir = root / (images_dir or f"images_{variant}")
  used = sorted({int(i) for index in indices.values() for i in index})
  paths = [os.path.join(image_dir, name) for name in names]
  if not all(os.path.isfile(paths[i]) for i in used):
    mat_path = common.require_file(root / "cuhk03_release" / "cuhk-03.mat", root, info)
    log.info("cuhk03: extracting %s images from %s into %s (once)", variant, mat_path, image_dir)
    written = extract_images(mat_path, variant, image_dir)
    log.info("cuhk03: wrote %d images", written)
    absent = [paths[i] for i in used if not os.path.isfile(paths[i])]
    if absent:
      raise ValueError(f"cuhk03: {mat_path} holds no {variant} image for {len(absent)} file(s) of "
                       f"{config_path.name}, e.g. {absent[0]}")
  records = [common.Record(path, int(pid), int(camid)) for path, pid, camid in zip(paths, pids, camids)]
  splits = {split: [records[i] for i in index] for split, index in indices.items()}
  if not eval_only:
    splits["train"], _ = common.relabel(splits["train"])
  common.check_counts(info.name, splits, EXPECTED[variant])
  return splits


INFOS = {
    variant: common.DatasetInfo(
        name=f"cuhk03_{variant}",
        kind="body",
        description=f"CUHK03 new protocol, {variant} boxes: 1,467 identities from 2 cameras per pair "
                    "(767 train / 700 test).",
        layout=LAYOUT,
        folder="cuhk03",
        loader=functools.partial(load, variant=variant),
        options={"images_dir": ""},
    )
    for variant in VARIANTS
}
