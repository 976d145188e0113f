"""Dataset registry: `load_splits(name, root, **options)` parses a dataset's original download layout.

  splits = load_splits("market1501", "/data/Market-1501-v15.09.15")
  splits["train"][0]  # Record(path='/data/.../0002_c1s1_000451_03.jpg', pid=2, camid=1, label=0)

Every dataset returns `train`, `query` and `gallery` lists of `Record`s (hand sets also `val`: one image per
training identity, excluded from `train`). Train and val records carry contiguous labels 0..n-1 in pid order;
`pid` and `camid` stay as in the dataset for evaluation (camid -1 = no camera, for hand sets).

`load_splits(..., eval_only=True)` returns `query` and `gallery` only, for evaluating a trained model: the
training part of the download (Market's bounding_box_train/, custom's train/, MSMT17's list_train.txt and
train/ images, the hand sets' training images) is neither read nor required, so a test-only copy works.
"""

import difflib
import inspect
import numbers
import os
import types
from typing import Any, Mapping

from data_pipelines.datasets import (common, cuhk03, custom, demo, demo_hands, dukemtmc, hands11k, hd, market1501,
                                      msmt17)
from data_pipelines.datasets.common import DatasetInfo, Record, Splits

__all__ = ["DATASETS", "DatasetInfo", "Record", "Splits", "get_dataset_info", "load_splits"]

DATASETS: Mapping[str, DatasetInfo] = types.MappingProxyType({
    info.name: info for info in (
        market1501.INFO, dukemtmc.INFO, *cuhk03.INFOS.values(), msmt17.INFO, *hands11k.INFOS.values(),
        hd.INFO, custom.INFO, demo.INFO, demo.INFO_B, demo_hands.INFO)
})

# Options every dataset accepts, with their defaults.
COMMON_OPTIONS = types.MappingProxyType({"verify_images": False})


def get_dataset_info(name: str) -> DatasetInfo:
  """The registry entry of `name`; a clear error listing the valid names (and the closest) otherwise."""
  if name not in DATASETS:
    close = difflib.get_close_matches(str(name), DATASETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(DATASETS)}")
  return DATASETS[name]


def _check_option(dataset: str, key: str, value: Any, default: Any) -> None:
  if isinstance(default, bool):
    ok, expected = isinstance(value, bool), "True or False"
  elif isinstance(default, int):
    ok, expected = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
  else:
    ok, expected = isinstance(value, (str, os.PathLike)), "a string"
  if not ok:
    raise ValueError(f"dataset {dataset!r}: option {key}={value!r} ({type(value).__name__}): expected {expected}")


def _takes_eval_only(loader) -> bool:
  try:
    parameters = inspect.signature(loader).parameters
  except (TypeError, ValueError):
    return False
  return "eval_only" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def load_splits(name: str, root: str | os.PathLike, *, eval_only: bool = False, **options: Any) -> Splits:
  """Parse dataset `name` at `root` into train/query/gallery (+val) record lists (query/gallery only with
  `eval_only`, see the module docstring).

  Options are the dataset's (see `DATASETS[name].options`) plus `verify_images=True`, which decodes every
  image once and reports the files that fail.
  """
  info = get_dataset_info(name)
  valid = {**info.options, **COMMON_OPTIONS}
  for key, value in options.items():
    if key not in valid:
      raise ValueError(f"dataset {name!r}: unknown option {key!r}; valid options: {', '.join(sorted(valid))}")
    _check_option(name, key, value, valid[key])
  verify = options.pop("verify_images", COMMON_OPTIONS["verify_images"])
  root = os.fspath(root) if root is not None else root
  if _takes_eval_only(info.loader):
    splits = info.loader(root, eval_only=bool(eval_only), **options)
  else:
    # A parser written without `eval_only` still evaluates (on a complete download): its test splits only.
    splits = info.loader(root, **options)
    if eval_only:
      splits = {k: splits[k] for k in ("query", "gallery")}
  common.check_labels(splits, name)
  if verify:
    common.verify_images(splits, name)
  return splits
