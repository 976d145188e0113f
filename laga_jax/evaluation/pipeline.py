"""Evaluate a trained model on its dataset's test protocol: features once, every query/gallery draw, figures.

Body datasets have one query/gallery split and cameras (same id + same camera removed from the ranking);
hand datasets (11k, HD) are scored over `config.eval.num_draws` seeded draws, with one feature extraction
for the union of their images.
"""

import logging
from typing import Any

import jax
import numpy as np

from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import figures, metrics

log = logging.getLogger("laga_jax")


def _draw_splits(exp) -> list:
  """The query/gallery splits to score: the configured split, plus draws 1..n-1 for the hand protocol."""
  from laga_jax.trainer import _dataset_records
  config = exp.config
  if config.eval.num_draws == 1:
    return [exp.splits]
  return [_dataset_records(config, draw=draw) for draw in range(config.eval.num_draws)]


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


def evaluate(exp, variables: Any, *, tag: str) -> dict:
  """Metrics of `variables` on the test protocol (JSON-ready); features and figures go to the workdir."""
  from data_pipelines import input_pipeline

  config = exp.config
  splits = _draw_splits(exp)
  records, draws = _union(splits)
  dp = exp.data_parallel
  batch_size = max(config.eval.batch_size - config.eval.batch_size % dp.num_devices, dp.num_devices)
  batches = input_pipeline.eval_batches(records, config.data, batch_size)
  feats = features_lib.extract_features(exp.feature_fn, variables, batches.as_numpy_iterator(),
                                        num_images=len(records), mesh=dp.mesh if dp.num_devices > 1 else None)
  pids = np.asarray([r.pid for r in records], np.int64)
  camids = None if config.data.kind == "hand" else np.asarray([r.camid for r in records], np.int64)
  if config.eval.save_features:
    features_lib.save_features(str(exp.workdir / f"features_{tag}.npz"), features=feats, pids=pids,
                               camids=np.full(len(pids), -1) if camids is None else camids,
                               paths=np.asarray([r.path for r in records]))
  scored = metrics.evaluate_draws(
      feats, pids, draws, camids, max_rank=config.eval.max_rank, query_chunk=config.eval.query_chunk,
      rerank=config.eval.rerank, k1=config.eval.rerank_k1, k2=config.eval.rerank_k2,
      lambda_value=config.eval.rerank_lambda)
  if scored["num_draws"] == 1:
    results = dict(scored["draws"][0])
  else:
    results = dict(scored["mean"], std=scored["std"], draws=scored["draws"])
  results["protocol"] = "hand" if camids is None else "body"
  results["num_query"], results["num_gallery"] = len(draws[0][0]), len(draws[0][1])
  if config.eval.num_figures > 0 and jax.process_index() == 0:
    results["figure"] = _save_figure(exp, feats, records, pids, camids, draws[0], tag)
  log.info("%s: rank-1 %.2f%%  mAP %.2f%%  mINP %.2f%%", tag, 100 * results["rank1"], 100 * results["mAP"],
           100 * results["mINP"])
  return results


def _save_figure(exp, feats, records, pids, camids, draw, tag: str) -> str:
  """The paper's Fig. 3/4 for `num_figures` seeded random queries of the first draw."""
  config = exp.config
  query, gallery = draw
  chosen = figures.pick_queries(len(query), config.eval.num_figures, seed=config.train.seed)
  q_cams = None if camids is None else camids[query]
  g_cams = None if camids is None else camids[gallery]
  topk = min(config.eval.figure_topk, len(gallery))
  ranked = figures.ranked_gallery(feats[query], feats[gallery], chosen, pids[query], pids[gallery], q_cams,
                                  g_cams, topk=topk)
  path = exp.workdir / f"ranked_results_{tag}.png"
  height, width = config.data.image_size
  scale = 128 / max(height, width)
  figures.save_ranked_results(str(path), [records[i].path for i in query], [records[i].path for i in gallery],
                              ranked, pids[query], pids[gallery], topk=topk, query_indices=chosen,
                              cell=(int(height * scale), int(width * scale)))
  return str(path)
