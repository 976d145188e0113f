"""What every dataset parser shares: the record type, relabelling, seeded picks and input checks."""

import collections
import dataclasses
import logging
import os
import pathlib
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Seed streams: the val pick must not depend on the draw, so one trained model serves all ten draws.
VAL_STREAM = 0
DRAW_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Record:
  """One image: absolute path, original identity (0 = distractor), camera (-1 = none) and train label."""
  path: str
  pid: int
  camid: int
  label: int = -1


Splits = dict[str, list[Record]]
Loader = Callable[..., Splits]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A registered dataset: its parser, options (with defaults) and what a user must download."""
  name: str
  kind: str                       # "body" (camera-aware protocol) or "hand" (no cameras, val split)
  description: str
  layout: str                     # the expected download layout, shown when a folder is missing
  folder: str                     # the download's usual folder name (TFDS manual_dir/<folder>)
  loader: Loader
  options: Mapping[str, object] = dataclasses.field(default_factory=dict)


def absolute_root(root: "str | os.PathLike | None", dataset: str) -> pathlib.Path:
  """The dataset root as an absolute path (symlinks kept), refusing an empty value."""
  if root is None or str(root) == "":
    raise ValueError(f"{dataset}: no dataset root given (set --config.data.root to the dataset folder)")
  return pathlib.Path(os.path.abspath(os.path.expanduser(str(root))))


def _nested_hint(root: pathlib.Path, missing: pathlib.Path) -> str:
  """Suggests root=<child> when the expected entry sits one folder deeper (an extra archive folder)."""
  try:
    relative = missing.relative_to(root)
    children = sorted(p for p in root.iterdir() if p.is_dir())
  except (ValueError, OSError):
    return ""
  for child in children:
    if (child / relative).exists():
      return f"\nDid you mean root={child}?"
  return ""


def require_dir(path: pathlib.Path, root: pathlib.Path, info: DatasetInfo) -> pathlib.Path:
  """Returns `path`, or raises FileNotFoundError naming it and showing the dataset's expected layout."""
  if not path.is_dir():
    raise FileNotFoundError(
        f"{info.name}: folder not found: {path}\n{info.description}\nExpected layout under root={root}:\n"
        f"{info.layout}{_nested_hint(root, path)}")
  return path


def require_file(path: pathlib.Path, root: pathlib.Path, info: DatasetInfo) -> pathlib.Path:
  """Returns `path`, or raises FileNotFoundError naming it and showing the dataset's expected layout."""
  if not path.is_file():
    raise FileNotFoundError(
        f"{info.name}: file not found: {path}\n{info.description}\nExpected layout under root={root}:\n"
        f"{info.layout}{_nested_hint(root, path)}")
  return path


def _first_lines(items: Sequence[str], shown: int = 5) -> str:
  """`items` one per indented line, the first few only (a broken download can miss thousands)."""
  more = [f"... and {len(items) - shown} more"] if len(items) > shown else []
  return "".join(f"\n  {item}" for item in [*items[:shown], *more])


def require_images(records: Iterable[Record], dataset: str, source: str) -> None:
  """Raises FileNotFoundError listing images that `source` (a list file, a manifest) names but are absent."""
  missing = [r.path for r in records if not os.path.isfile(r.path)]
  if missing:
    raise FileNotFoundError(f"{dataset}: {len(missing)} image(s) listed in {source} do not exist:"
                            f"{_first_lines(missing)}")


def list_files(folder: pathlib.Path, suffixes: Sequence[str]) -> list[str]:
  """Names of the files in `folder` that end with one of `suffixes` (case-insensitive), sorted.

  A dangling symbolic link is listed too (as the image it was meant to be), so that the image check
  (`data_pipelines.image_check`) reports it instead of the split silently shrinking.
  """
  suffixes = tuple(s.lower() for s in suffixes)
  with os.scandir(folder) as entries:
    return sorted(e.name for e in entries if e.name.lower().endswith(suffixes)
                  and (e.is_file() or (e.is_symlink() and not os.path.exists(e.path))))


def parse_image_folder(folder: pathlib.Path, pattern: re.Pattern, example: str, dataset: str,
                       drop_pids: Sequence[int] = (-1,)) -> list[Record]:
  """Records from a flat folder of `.jpg` files named like `example`; `pattern` captures `pid` and `camid`.

  Other file types (e.g. the `Thumbs.db` shipped in some archives) are ignored; a `.jpg` whose name does
  not match is an error, because a silently skipped image would change the split counts.
  """
  records = []
  for name in list_files(folder, (".jpg",)):
    match = pattern.fullmatch(name)
    if match is None:
      raise ValueError(f"{dataset}: unexpected file name {folder / name}: expected names like {example!r}")
    pid = int(match["pid"])
    if pid not in drop_pids:
      records.append(Record(os.path.join(folder, name), pid, int(match["camid"])))
  return records


def relabel(records: Sequence[Record]) -> tuple[list[Record], dict[int, int]]:
  """Contiguous labels 0..n-1 over the identities of `records`, in increasing pid order."""
  pid_to_label = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
  return [dataclasses.replace(r, label=pid_to_label[r.pid]) for r in records], pid_to_label


def group_by_pid(records: Iterable[Record]) -> dict[int, list[Record]]:
  """Records per identity, identities and images in sorted order (so seeded picks are reproducible)."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[r.pid].append(r)
  return {pid: sorted(groups[pid], key=lambda r: r.path) for pid in sorted(groups)}


def pick_one_per_identity(records: Sequence[Record],
                          rng: np.random.Generator) -> tuple[list[Record], list[Record]]:
  """Splits `records` into one randomly picked image per identity and all the others."""
  picked, rest = [], []
  for items in group_by_pid(records).values():
    k = int(rng.integers(len(items)))
    picked.append(items[k])
    rest.extend(items[:k] + items[k + 1:])
  return picked, rest


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
  """A generator determined by (seed, keys) only, independent of any global random state."""
  return np.random.default_rng([seed, *keys])


def hold_out_val(train_all: Sequence[Record], seed: int, key: int) -> tuple[list[Record], list[Record]]:
  """(train, val): one image per identity held out for validation, then labels 0..n-1 over what trains.

  An identity with a single image keeps it for training and has no validation image: held out, it would
  leave the identity without training images, so its label would exceed the classifier's classes. Labels
  are assigned after the hold-out, over the training identities, and the val images take their identity's
  training label, so every label of both lists lies in [0, number of training identities).
  """
  rng = seeded_rng(seed, VAL_STREAM, key)
  val, train = [], []
  for items in group_by_pid(train_all).values():
    k = int(rng.integers(len(items)))  # drawn for every identity, so the picks do not depend on singletons
    if len(items) == 1:
      train.extend(items)
      continue
    val.append(items[k])
    train.extend(items[:k] + items[k + 1:])
  if len(val) < len({r.pid for r in train}):
    log.info("%d training identit(ies) with a single image have no validation image",
             len({r.pid for r in train}) - len(val))
  train, pid_to_label = relabel(train)
  val = [dataclasses.replace(r, label=pid_to_label[r.pid]) for r in val]
  return train, val


def draw_gallery(test: Sequence[Record], seed: int, draw: int, key: int) -> tuple[list[Record], list[Record]]:
  """(gallery, query) of one Monte-Carlo draw: one image per test identity in the gallery, the rest query."""
  return pick_one_per_identity(test, seeded_rng(seed, DRAW_STREAM, key, draw))


def check_labels(splits: Mapping[str, Sequence[Record]], dataset: str) -> None:
  """Raises ValueError unless train labels are exactly 0..n-1 (n = training identities), one label per
  identity, and every val label is the label of its identity in train.

  The classifier has n outputs; a label outside [0, n) would index past them and give a silently wrong loss.
  """
  train = splits.get("train") or []
  label_of = {}
  for r in train:
    if label_of.setdefault(r.pid, r.label) != r.label:
      raise ValueError(f"{dataset}: identity {r.pid} has train labels {label_of[r.pid]} and {r.label}")
  labels = sorted(label_of.values())
  if labels != list(range(len(labels))):
    raise ValueError(f"{dataset}: train labels must be 0..{len(labels) - 1} (one per training identity), "
                     f"got {labels[0]}..{labels[-1]}")
  for r in splits.get("val") or []:
    if label_of.get(r.pid) != r.label:
      raise ValueError(f"{dataset}: val image {r.path} has label {r.label}, but its identity {r.pid} "
                       f"{'has no training images' if r.pid not in label_of else 'trains as ' + str(label_of[r.pid])}")


def counts(records: Sequence[Record]) -> tuple[int, int]:
  """(identities, images) of a split."""
  return len({r.pid for r in records}), len(records)


def check_counts(dataset: str, splits: Mapping[str, Sequence[Record]],
                 expected: Mapping[str, tuple[int, int]]) -> bool:
  """Warns (does not fail) when a split's (ids, images) differ from the published split sizes.

  A mismatch usually means an incomplete download or an edited metadata file; edited copies are
  legitimate inputs, so this only warns. Splits that were not parsed (train, for evaluation only) are not
  checked.
  """
  ok = True
  for split, want in expected.items():
    if split not in splits:
      continue
    got = counts(splits[split])
    if got != tuple(want):
      ok = False
      log.warning("%s %s: %d ids / %d images, expected %d ids / %d images (the published split) - "
                  "incomplete download or edited metadata?", dataset, split, *got, *want)
  return ok


def verify_images(splits: Mapping[str, Sequence[Record]], dataset: str) -> None:
  """Decodes every image once with PIL and raises ValueError naming the files that fail."""
  from PIL import Image  # Deferred: only this optional check needs PIL here.

  bad = []
  for path in sorted({r.path for records in splits.values() for r in records}):
    try:
      with Image.open(path) as image:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
      bad.append(f"{path}: {error}")
  if bad:
    raise ValueError(f"{dataset}: {len(bad)} image(s) cannot be decoded:{_first_lines(bad)}")
