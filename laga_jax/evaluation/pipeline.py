"""Evaluate a trained model on its dataset's test protocol: features once, every query/gallery draw, figures.

Body datasets have one query/gallery split and cameras (same id + same camera removed from the ranking);
hand datasets (11k, HD) are scored over `config.eval.num_draws` seeded draws, with one feature extraction
for the union of their images.
"""

import json
import logging
import pathlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import figures, metrics

log = logging.getLogger("laga_jax")


def _union(splits: list) -> tuple:
  """Every test record once (first appearance order) and, per split, its query and gallery row indices."""
  position, records, draws = {}, [], []
  for split in splits:
    rows = {}
    for part in ("query", "gallery"):
      idx = []
      for record in split[part]:
        if record.path not in position:
          position[record.path] = len(records)
          records.append(record)
        elif records[position[record.path]].pid != record.pid:
          raise ValueError(f"{record.path}: identity {record.pid} in one draw and "
                           f"{records[position[record.path]].pid} in another")
        idx.append(position[record.path])
      rows[part] = np.asarray(idx, np.int64)
    draws.append((rows["query"], rows["gallery"]))
  return records, draws


def evaluate(config, splits: Sequence[dict], feature_fn: Callable, variables: Any, *, workdir: str,
             tag: str, mesh: Optional[Mesh] = None) -> dict:
  """Metrics of `variables` on the test protocol (JSON-ready); features and figures go to `workdir`.

  `splits` are the query/gallery draws to score (one for body datasets, `config.eval.num_draws` for hands),
  each a dict with "query" and "gallery" records; `feature_fn(variables, images)` is the model's
  un-normalised eval feature; `mesh` spreads extraction over its devices.
  """
  from data_pipelines import input_pipeline

  workdir = pathlib.Path(workdir)
  records, draws = _union(splits)
  num_devices = 1 if mesh is None else mesh.devices.size
  batch_size = max(config.eval.batch_size - config.eval.batch_size % num_devices, num_devices)
  # Several processes: each reads and extracts its slice of every batch; the features come back whole.
  processes = jax.process_count() if num_devices > 1 else 1
  batches = input_pipeline.eval_batches(records, config.data, batch_size // processes,
                                        process_index=jax.process_index() if processes > 1 else 0,
                                        process_count=processes)
  feats = features_lib.extract_features(feature_fn, variables, batches.as_numpy_iterator(),
                                        num_images=len(records), mesh=mesh if num_devices > 1 else None,
                                        flip=bool(config.eval.get("flip", True)))
  # The metrics once, on process 0 (which alone writes files); the other processes receive its results.
  results = _score(config, workdir, tag, feats, records, draws) if jax.process_index() == 0 else None
  return _from_process_0(results)


def _from_process_0(value: Any) -> Any:
  """`value` (JSON-able) of process 0, on every process of a multi-process job."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else None
  size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if payload is None else payload.size)))
  buffer = payload if payload is not None else np.zeros(size, np.uint8)
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def _score(config, workdir: pathlib.Path, tag: str, feats: np.ndarray, records: list, draws: list) -> dict:
  """Metrics over the draws, and the features, per-query scores and figures written to `workdir`."""
  pids = np.asarray([r.pid for r in records], np.int64)
  camids = None if config.data.kind == "hand" else np.asarray([r.camid for r in records], np.int64)
  if config.eval.save_features:
    features_lib.save_features(str(workdir / f"features_{tag}.npz"), features=feats, pids=pids,
                               camids=np.full(len(pids), -1) if camids is None else camids,
                               paths=np.asarray([r.path for r in records]))
  scored = metrics.evaluate_draws(
      feats, pids, draws, camids, max_rank=config.eval.max_rank, query_chunk=config.eval.query_chunk,
      rerank=config.eval.rerank, k1=config.eval.rerank_k1, k2=config.eval.rerank_k2,
      lambda_value=config.eval.rerank_lambda)
  per_query = scored.pop("per_query")
  per_query_file = f"per_query_{tag}.npz" if per_query else None
  if per_query:
    # Per-query scores of the first draw, so two models can be compared query by query.
    query = draws[0][0]
    np.savez(workdir / per_query_file, paths=np.asarray([records[i].path for i in query]),
             pids=pids[query], **{k: np.asarray(v) for k, v in per_query.items()})
  if scored["num_draws"] == 1:
    results = dict(scored["draws"][0])
  else:
    results = dict(scored["mean"], std=scored["std"], draws=scored["draws"])
  results["protocol"] = "hand" if camids is None else "body"
  results["num_query"], results["num_gallery"] = len(draws[0][0]), len(draws[0][1])
  if per_query_file:
    results["per_query_file"] = per_query_file   # beside results.json: AP and first true match per query
  if config.eval.num_figures > 0:
    results["figure"] = _save_figure(config, workdir, feats, records, pids, camids, draws[0], tag)
  log.info("%s: rank-1 %.2f%%  mAP %.2f%%  mINP %.2f%%", tag, 100 * results["rank1"], 100 * results["mAP"],
           100 * results["mINP"])
  return results


def _save_figure(config, workdir: pathlib.Path, feats, records, pids, camids, draw, tag: str) -> str:
  """The paper's Fig. 3/4 for `num_figures` seeded random queries of the first draw."""
  query, gallery = draw
  chosen = figures.pick_queries(len(query), config.eval.num_figures, seed=config.train.seed)
  q_cams = None if camids is None else camids[query]
  g_cams = None if camids is None else camids[gallery]
  topk = min(config.eval.figure_topk, len(gallery))
  ranked = figures.ranked_gallery(feats[query], feats[gallery], chosen, pids[query], pids[gallery], q_cams,
                                  g_cams, topk=topk)
  path = workdir / f"ranked_results_{tag}.png"
  height, width = config.data.image_size
  scale = 128 / max(height, width)
  figures.save_ranked_results(str(path), [records[i].path for i in query], [records[i].path for i in gallery],
                              ranked, pids[query], pids[gallery], topk=topk, query_indices=chosen,
                              cell=(int(height * scale), int(width * scale)))
  return str(path)
