"""A gallery index: features of a folder of images extracted once, then searched by many queries.

    python run.py --config runs/demo/config.json --workdir runs/demo --mode index --gallery_dir camera_dump/
    python run.py --config runs/demo/config.json --workdir runs/demo --mode search --query me.jpg --topk 10
    python run.py --config runs/demo/config.json --workdir runs/demo --mode search --query queries/

The index (`<workdir>/index.npz` unless `--index` names another file) holds the L2-normalised features,
the absolute paths with each file's size and modification time, and the model's id and image size.
Indexing a folder again extracts only the images that are new or changed and drops those that are gone;
other folders already in the index stay. An index built by another model, another checkpoint of the same run
or at another image size is refused with the reason (`--rebuild_index` starts it afresh): features of
different models are not comparable.
"""

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from laga_jax import inference

log = logging.getLogger("laga_jax")

INDEX_FILE = "index.npz"
RESULTS_FILE = "search_results.json"
FIGURE_FILE = "search_results.png"
FORMAT_VERSION = 1
FIGURE_ROWS = 16   # queries drawn in the ranked-results picture (all are in the JSON)


class IndexMismatchError(ValueError):
  """An index that cannot be used with this model: another model, checkpoint, image size or format."""


def _stat(path: str) -> Tuple[int, int]:
  stat = os.stat(path)
  return int(stat.st_size), int(stat.st_mtime_ns)


@dataclasses.dataclass
class GalleryIndex:
  """Features (N, D) float32 of `paths` (absolute), their files' sizes and mtimes (ns), and the model."""
  features: np.ndarray
  paths: List[str]
  sizes: np.ndarray
  mtimes: np.ndarray
  meta: Dict[str, Any]

  def __len__(self) -> int:
    return len(self.paths)

  @classmethod
  def empty(cls, extractor: "inference.FeatureExtractor") -> "GalleryIndex":
    return cls(np.zeros((0, extractor.feature_dim), np.float32), [], np.zeros(0, np.int64),
               np.zeros(0, np.int64), model_meta(extractor))

  @classmethod
  def load(cls, path: Union[str, os.PathLike]) -> "GalleryIndex":
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"--index {path}: no index; build one with --mode index --gallery_dir <folder>")
    try:
      with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return cls(data["features"].astype(np.float32), [str(p) for p in data["paths"]],
                   data["sizes"].astype(np.int64), data["mtimes"].astype(np.int64), meta)
    except (KeyError, ValueError, OSError) as error:
      raise IndexMismatchError(f"--index {path}: not a gallery index written by --mode index ({error})") from None

  def save(self, path: Union[str, os.PathLike]) -> None:
    """Write atomically (a temporary file renamed), so an interrupted run leaves the old index intact."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(self.meta, count=len(self.paths), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    scratch = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(scratch, features=self.features.astype(np.float32), paths=np.asarray(self.paths, dtype=str),
             sizes=self.sizes.astype(np.int64), mtimes=self.mtimes.astype(np.int64), meta=np.asarray(json.dumps(meta)))
    os.replace(scratch, path)
    self.meta = meta

  def check(self, extractor: "inference.FeatureExtractor", where: str = "index") -> None:
    """Raise `IndexMismatchError` with the reason when this index was not built by `extractor`'s model."""
    meta, mine = self.meta, model_meta(extractor)
    if meta.get("format") != FORMAT_VERSION:
      raise IndexMismatchError(f"{where}: index format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; "
                               "rebuild it (--mode index --rebuild_index)")
    if meta.get("model_id") != mine["model_id"]:
      same_run = meta.get("workdir") and meta.get("workdir") == mine.get("workdir")
      if same_run and meta.get("fingerprint") == mine.get("fingerprint"):
        reason = (f"it was built from step {meta.get('step')} ({meta.get('checkpoint')} checkpoint) of this run, "
                  f"whose {mine.get('checkpoint')} checkpoint is now step {mine.get('step')}: it is stale")
      else:
        reason = (f"it was built by another model ({_describe(meta)}; this one is {_describe(mine)}), "
                  "whose features are not comparable")
      raise IndexMismatchError(f"{where}: {reason}. Rebuild it with --mode index --rebuild_index, or use "
                               "--index to keep a separate index per model")
    if list(meta.get("image_size", [])) != list(mine["image_size"]):
      raise IndexMismatchError(f"{where}: built at image size {meta.get('image_size')}, the model takes "
                               f"{mine['image_size']}; rebuild it with --mode index --rebuild_index")
    if self.features.ndim != 2 or self.features.shape[1] != extractor.feature_dim:
      raise IndexMismatchError(f"{where}: features of size {self.features.shape[1:]}, the model gives "
                               f"{extractor.feature_dim}; rebuild it with --mode index --rebuild_index")


def _describe(meta: dict) -> str:
  source = meta.get("workdir") or meta.get("export") or "?"
  return f"{meta.get('model', '?')} id {meta.get('model_id')} from {source}, step {meta.get('step', '?')}"


def model_meta(extractor: "inference.FeatureExtractor") -> dict:
  """What an index records about the model that filled it."""
  keys = ("model_id", "model", "fingerprint", "feature_dim", "image_size", "checkpoint", "step", "workdir", "export")
  return dict({k: extractor.metadata[k] for k in keys if k in extractor.metadata}, format=FORMAT_VERSION)


def _folder_images(folders: Sequence[str]) -> List[str]:
  paths = []
  for folder in folders:
    found = inference.find_images(folder)
    if not found:
      raise FileNotFoundError(f"--gallery_dir {folder}: no {'/'.join(inference.IMAGE_SUFFIXES)} images found "
                              "(searched recursively)")
    paths.extend(os.path.abspath(p) for p in found)
  return sorted(set(paths))


def _readable(paths: Sequence[str], *, root: Optional[str], policy: str, what: str) -> List[str]:
  """`paths` once they decode; unreadable ones stop the run naming them ("stop") or are left out ("skip")."""
  from data_pipelines import image_check
  if not paths:
    return []
  bad = image_check.check_files(paths, root=root)
  if not bad:
    return list(paths)
  if policy != "skip":
    raise image_check.BadImagesError(f"{len(bad)} unreadable image(s) in {what}: {image_check.describe(bad)}; fix "
                                     "or remove them, or set --config.data.bad_images=skip to leave them out")
  log.warning("skipping %d unreadable image(s) in %s: %s", len(bad), what, image_check.describe(bad))
  return [p for p in paths if p not in bad]


def update_index(extractor: "inference.FeatureExtractor", folders: Sequence[str],
                 index_path: Union[str, os.PathLike], *, rebuild: bool = False,
                 bad_images: str = "stop") -> Tuple[GalleryIndex, dict]:
  """Add the images under `folders` (recursive) to the index at `index_path` (created if absent).

  Only new or changed files (by size and mtime) are extracted; entries whose file is gone are dropped.
  Returns the saved index and counts {"added", "updated", "removed", "kept", "total"}.
  """
  index_path = pathlib.Path(index_path)
  if index_path.exists() and not rebuild:
    index = GalleryIndex.load(index_path)
    index.check(extractor, where=f"--index {index_path}")
  else:
    index = GalleryIndex.empty(extractor)
  listed = _folder_images(folders)
  known, listed_set = set(index.paths), set(listed)
  keep, stale_rows = [], 0
  for i, path in enumerate(index.paths):
    if not os.path.exists(path):
      continue
    if path in listed_set and (int(index.sizes[i]), int(index.mtimes[i])) != _stat(path):
      stale_rows += 1
      continue
    keep.append(i)
  kept_paths = {index.paths[i] for i in keep}
  todo = [p for p in listed if p not in kept_paths]
  todo = _readable(todo, root=folders[0] if len(folders) == 1 else None, policy=bad_images,
                   what="--gallery_dir " + ", ".join(map(str, folders)))
  stats = {"added": sum(p not in known for p in todo), "updated": stale_rows,
           "removed": len(index.paths) - len(keep) - stale_rows, "kept": len(keep)}
  if todo:
    log.info("index: extracting %d image(s) (%d already indexed)", len(todo), len(keep))
    stat = [_stat(p) for p in todo]
    new = extractor.extract(todo, progress=True)
  else:
    stat, new = [], np.zeros((0, extractor.feature_dim), np.float32)
  rows = np.asarray(keep, np.int64)
  paths = [index.paths[i] for i in keep] + todo
  order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
  features = np.concatenate([index.features[rows], new])[order]
  sizes = np.concatenate([index.sizes[rows], np.asarray([s for s, _ in stat], np.int64)])[order]
  mtimes = np.concatenate([index.mtimes[rows], np.asarray([m for _, m in stat], np.int64)])[order]
  roots = sorted(set(index.meta.get("folders", [])) | {os.path.abspath(f) for f in folders})
  meta = dict(index.meta, **model_meta(extractor), folders=roots)
  meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
  index = GalleryIndex(features, [paths[i] for i in order], sizes, mtimes, meta)
  index.save(index_path)
  stats["total"] = len(index)
  return index, stats


def _query_paths(queries: Sequence[str]) -> List[str]:
  """Query files, and the images under query folders (recursive), in the order given."""
  paths = []
  for query in queries:
    if os.path.isdir(query):
      found = inference.find_images(query)
      if not found:
        raise FileNotFoundError(f"--query {query}: no {'/'.join(inference.IMAGE_SUFFIXES)} images in this folder")
      paths.extend(found)
    elif os.path.isfile(query):
      paths.append(query)
    else:
      raise FileNotFoundError(f"--query {query}: no such image file or folder")
  return paths


def search(extractor: "inference.FeatureExtractor", index: GalleryIndex, queries: Sequence[str], *,
           topk: int = 10) -> List[dict]:
  """Per query: {"query", "matches": [{"rank", "path", "distance", "cosine_similarity"}]}, nearest first."""
  if not len(index):
    raise ValueError("the index is empty: add images with --mode index --gallery_dir <folder>")
  paths = _query_paths(queries)
  features = extractor.extract(paths)
  indices, distances = inference.rank(features, index.features, topk)
  return [{"query": os.path.abspath(query),
           "matches": [{"rank": r + 1, "path": index.paths[j], "distance": float(d),
                        "cosine_similarity": float(1.0 - d)} for r, (j, d) in enumerate(zip(row, dist))]}
          for query, row, dist in zip(paths, indices, distances)]


# --- picture -----------------------------------------------------------------------------------------------

def save_search_figure(path: Union[str, os.PathLike], results: Sequence[dict], *, cell: Tuple[int, int] = (128, 64),
                       max_rows: int = FIGURE_ROWS) -> str:
  """A PNG with one row per query (the query, then its matches left to right, each labelled with its rank
  and cosine similarity); identities are unknown here, so frames are neutral."""
  from PIL import Image, ImageDraw

  from laga_jax.evaluation import figures
  rows = list(results)[:max_rows]
  topk = max((len(r["matches"]) for r in rows), default=0)
  border, gap, label = 4, 16, 14
  framed_h, framed_w = cell[0] + 2 * border, cell[1] + 2 * border
  canvas = Image.new("RGB", figures.figure_size(len(rows), topk, cell, border, gap, label), figures.BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for row, result in enumerate(rows):
    top = gap + row * (label + framed_h + gap) + label
    cells = [(result["query"], "query", figures.QUERY)]
    cells += [(m["path"], f"#{m['rank']}  {m['cosine_similarity']:.2f}", (90, 110, 170)) for m in result["matches"]]
    for column, (image_path, text, colour) in enumerate(cells):
      left = gap + column * (framed_w + gap)
      draw.rectangle([left, top, left + framed_w - 1, top + framed_h - 1], fill=colour)
      with Image.open(image_path) as image:
        canvas.paste(image.convert("RGB").resize(cell[::-1], Image.BICUBIC), (left + border, top + border))
      draw.text((left, top - label), text, fill=(0, 0, 0))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path, format="PNG")
  return str(path)


# --- run.py modes ------------------------------------------------------------------------------------------

def default_index_path(workdir: Union[str, os.PathLike]) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / INDEX_FILE


def index_workdir(config, workdir: str, *, gallery_dirs: Sequence[str], index_path: Optional[str] = None,
                  rebuild: bool = False) -> dict:
  """`run.py --mode index`: add `gallery_dirs` to the index of the trained model in `workdir`."""
  if not gallery_dirs:
    raise FileNotFoundError("--mode index: give the folder(s) of gallery images with --gallery_dir")
  extractor = inference.FeatureExtractor.from_workdir(workdir, config=config)
  path = pathlib.Path(index_path) if index_path else default_index_path(workdir)
  index, stats = update_index(extractor, gallery_dirs, path, rebuild=rebuild,
                              bad_images=config.data.get("bad_images", "stop"))
  print(f"index {path}: {stats['total']} images ({stats['added']} added, {stats['updated']} updated, "
        f"{stats['removed']} removed, {stats['kept']} unchanged)")
  return dict(stats, index=str(path))


def search_workdir(config, workdir: str, *, queries: Sequence[str], index_path: Optional[str] = None,
                   gallery_dirs: Sequence[str] = (), topk: int = 10, rebuild: bool = False) -> dict:
  """`run.py --mode search`: rank the gallery of a saved index for each query; `gallery_dirs` are indexed
  (incrementally) first. Writes `search_results.json` and `search_results.png` into the workdir."""
  if not queries:
    raise FileNotFoundError("--mode search: give --query (an image, several --query flags, or a folder)")
  extractor = inference.FeatureExtractor.from_workdir(workdir, config=config)
  path = pathlib.Path(index_path) if index_path else default_index_path(workdir)
  policy = config.data.get("bad_images", "stop")
  if gallery_dirs:
    index, _ = update_index(extractor, gallery_dirs, path, rebuild=rebuild, bad_images=policy)
  else:
    index = GalleryIndex.load(path)
    index.check(extractor, where=f"--index {path}")
  query_paths = _readable(_query_paths(queries), root=None, policy="stop", what="--query")
  start = time.perf_counter()
  results = search(extractor, index, query_paths, topk=topk)
  seconds = time.perf_counter() - start
  out_dir = pathlib.Path(workdir).absolute()
  figure = save_search_figure(out_dir / FIGURE_FILE, results)
  summary = {"index": str(path), "model_id": extractor.model_id, "gallery_size": len(index), "topk": int(topk),
             "num_queries": len(results), "seconds": seconds, "figure": figure, "results": results}
  if len(results) == 1:  # one query: its matches at the top level too
    summary.update(query=results[0]["query"], matches=results[0]["matches"])
  (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
  for result in results[:FIGURE_ROWS]:
    print(f"query {result['query']}")
    for match in result["matches"]:
      print(f"  {match['rank']:3d}  {match['cosine_similarity']:.4f}  {match['path']}")
  print(f"saved {out_dir / RESULTS_FILE} and {figure} ({len(results)} queries against {len(index)} images)")
  return summary
