"""Every image of a run checked before the first training step, so a bad file stops the run at once.

TensorFlow reports an undecodable file only when the input pipeline reaches it, which for a query or gallery
image is after the whole training. `check_splits` opens every image of every split up front: a dangling
symbolic link, an empty or truncated file, or a file that is not a JPEG, PNG, GIF or BMP image (what the
input pipeline decodes). It decodes in parallel threads (Pillow releases the GIL while decoding; JPEGs are
decoded at 1/8 scale, which still reads every byte of the compressed data) and remembers every good file by
(path, size, modification time) in a cache per dataset root, so a rerun on the same files only `stat`s them.

Bad files stop the run with one line naming every one of them (`--config.data.bad_images=stop`, the
default), or are left out with a warning naming them (`--config.data.bad_images=skip`).
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Iterable, Mapping, Optional, Sequence

log = logging.getLogger("laga_jax")

POLICIES = ("stop", "skip")
# Formats `tf.io.decode_image` reads (MPO is the JPEG variant some cameras write).
DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
CACHE_VERSION = 1
_REPORTED: set = set()  # bad files already warned about in this process (hand sets reload splits per draw)


class BadImagesError(ValueError):
  """Images that cannot be decoded; the message names every one of them."""


def cache_dir() -> pathlib.Path:
  """Where verdicts are cached: $LAGA_CACHE_DIR, else $XDG_CACHE_HOME/laga_jax, else ~/.cache/laga_jax."""
  if os.environ.get("LAGA_CACHE_DIR"):
    return pathlib.Path(os.environ["LAGA_CACHE_DIR"]) / "image_check"
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "laga_jax" / "image_check"


def _one_line(text: str, limit: int = 160) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def check_image(path: str) -> Optional[str]:
  """Why `path` cannot be read as an image (a few words), or None when it decodes."""
  from PIL import Image, UnidentifiedImageError  # Deferred: keeps importing this module cheap.

  if os.path.islink(path) and not os.path.exists(path):
    return f"broken symbolic link to {os.readlink(path)}"
  try:
    stat = os.stat(path)
  except OSError as error:
    return f"cannot be read: {error.strerror or error}"
  if not os.path.isfile(path):
    return "not a file"
  if stat.st_size == 0:
    return "empty file"
  try:
    with Image.open(path) as image:
      if image.format not in DECODABLE_FORMATS:
        return f"{image.format} image, expected JPEG, PNG, GIF or BMP"
      if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except UnidentifiedImageError:
    return "not an image"
  except Exception as error:  # noqa: BLE001 - Pillow raises many types for damaged data.
    return f"truncated or corrupt ({_one_line(error, 80)})"
  return None


def _signature(path: str) -> Optional[list]:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return [stat.st_size, stat.st_mtime_ns]


def _cache_file(root: str) -> pathlib.Path:
  key = hashlib.sha256(os.path.abspath(os.path.expanduser(str(root))).encode()).hexdigest()[:24]
  return cache_dir() / f"{key}.json"


def _load_cache(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("good"), dict):
    return {}
  return data["good"]


def _save_cache(path: pathlib.Path, root: str, good: dict) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".tmp{os.getpid()}")
    scratch.write_text(json.dumps({"version": CACHE_VERSION, "root": str(root), "good": good}))
    os.replace(scratch, path)
  except OSError as error:  # A read-only home must not stop a run: the check is only repeated next time.
    log.debug("image check cache not written (%s)", error)


def check_files(paths: Iterable[str], *, root: Optional[str] = None, workers: Optional[int] = None,
                use_cache: bool = True) -> dict:
  """{path: reason} of the files among `paths` that cannot be decoded (empty when all are fine).

  Good verdicts are cached per `root` (default: the files' common folder) by (size, mtime).
  """
  paths = sorted(set(map(str, paths)))
  if not paths:
    return {}
  root = str(root) if root else os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  cache_path = _cache_file(root)
  good = _load_cache(cache_path) if use_cache else {}
  signatures = {p: _signature(p) for p in paths}
  todo = [p for p in paths if signatures[p] is None or good.get(p) != signatures[p]]
  bad = {}
  if todo:
    start = time.perf_counter()
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for path, reason in zip(todo, pool.map(check_image, todo, chunksize=16)):
        if reason is None:
          good[path] = signatures[path]
        else:
          bad[path] = reason
          good.pop(path, None)
    if len(todo) > 100:
      log.info("checked %d images in %.1f s (%d cached as good)", len(todo), time.perf_counter() - start,
               len(paths) - len(todo))
    if use_cache:
      _save_cache(cache_path, root, good)
  return bad


def describe(bad: Mapping[str, str]) -> str:
  """'path (reason), path (reason)' on one line, every file named."""
  return ", ".join(f"{path} ({reason})" for path, reason in sorted(bad.items()))


def _relabel_after_skip(splits: dict) -> dict:
  """Contiguous train labels again when skipping removed an identity's last training image."""
  from data_pipelines.datasets import common

  train = splits.get("train") or []
  if sorted({r.label for r in train}) == list(range(len({r.pid for r in train}))):
    return splits
  train, pid_to_label = common.relabel(train)
  out = dict(splits, train=train)
  if "val" in splits:
    out["val"] = [dataclasses.replace(r, label=pid_to_label[r.pid]) for r in splits["val"] if r.pid in pid_to_label]
  return out


def check_splits(splits: Mapping[str, Sequence], *, dataset: str, root: Optional[str], policy: str = "stop",
                 workers: Optional[int] = None) -> dict:
  """`splits` once every image decodes; raises `BadImagesError` (policy "stop") or drops the bad ones ("skip").

  With "skip", training identities left without images are dropped and the labels made contiguous again.
  """
  if policy not in POLICIES:
    raise ValueError(f"--config.data.bad_images={policy!r}: expected one of {', '.join(map(repr, POLICIES))}")
  bad = check_files((r.path for records in splits.values() for r in records), root=root, workers=workers)
  if not bad:
    return dict(splits)
  if policy == "stop":
    raise BadImagesError(
        f"{len(bad)} unreadable image(s) in dataset {dataset!r}: {describe(bad)}; fix or remove them, or "
        "set --config.data.bad_images=skip to leave them out")
  new = {path: reason for path, reason in bad.items() if path not in _REPORTED}
  if new:
    _REPORTED.update(new)
    log.warning("skipping %d unreadable image(s) of dataset %r (--config.data.bad_images=skip): %s",
                len(new), dataset, describe(new))
  kept = {split: [r for r in records if r.path not in bad] for split, records in splits.items()}
  return _relabel_after_skip(kept)


def check_search_images(query: str, gallery: Sequence[str], *, gallery_dir: str, policy: str = "stop") -> list:
  """The gallery images of `--mode search` once they (and the query) decode; policy as in `check_splits`."""
  if policy not in POLICIES:
    raise ValueError(f"--config.data.bad_images={policy!r}: expected one of {', '.join(map(repr, POLICIES))}")
  bad_query = check_files([query], use_cache=False)
  if bad_query:
    raise BadImagesError(f"--query {query}: cannot be read as an image ({bad_query[query]})")
  bad = check_files(gallery, root=gallery_dir)
  if not bad:
    return list(gallery)
  if policy == "stop":
    raise BadImagesError(f"{len(bad)} unreadable image(s) in --gallery_dir {gallery_dir}: {describe(bad)}; fix or "
                         "remove them, or set --config.data.bad_images=skip to leave them out")
  log.warning("skipping %d unreadable gallery image(s) (--config.data.bad_images=skip): %s", len(bad),
              describe(bad))
  kept = [path for path in gallery if path not in bad]
  if not kept:
    raise BadImagesError(f"--gallery_dir {gallery_dir}: none of its {len(gallery)} images can be read")
  return kept
