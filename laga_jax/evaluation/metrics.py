"""Re-identification ranking metrics: CMC, mAP (trapezoidal and step), mINP, from a distance matrix.

The gallery is ranked by ascending distance, ties in gallery-index order (a stable sort). The metrics need
only the rank of each true match, never a full sort: for a chunk of queries one jitted kernel compares
every gallery distance with the query's few same-id distances and histograms the outcome, which tells how
many items precede each same-id item. That is O(G·m) simple operations per query (m = same-id gallery
items) and a few (chunk × gallery) arrays of memory.

Body protocol (camids given): gallery items with the query's id *and* camera are removed from its ranking,
other ids (distractors included) stay as negatives, and queries left without a match are skipped: they
count in no average. Hand protocol (camids None): every same-id gallery item is a match.
"""

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from laga_jax.evaluation import rerank as rerank_lib

Array = Union[np.ndarray, jax.Array]
# Same-id distances are compared with the gallery this many at a time (XLA vectorises a short minor-axis
# reduction well, a long one poorly); their number per query is padded to a multiple of it.
_GROUP = 8
# Default distances per query chunk (queries x gallery): small enough for the chunk's few arrays to stay
# in cache, large enough to amortise dispatch.
_CHUNK_ELEMENTS = 1 << 21


def _labels(name: str, values: Array, length: Optional[int] = None) -> np.ndarray:
  """A 1-D integer label array, or a ValueError naming `name`."""
  array = np.asarray(values)
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f"{name}: expected a 1-D integer array, got dtype {array.dtype} and shape {array.shape}")
  if length is not None and len(array) != length:
    raise ValueError(f"{name}: expected {length} entries, got {len(array)}")
  return array.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SameIdTable:
  """Each query's same-id gallery items, as a slice of the gallery sorted by id, and its camera."""
  gallery_by_id: np.ndarray    # gallery indices stably sorted by id
  start: np.ndarray            # (Q,) where the query's id starts in `gallery_by_id`
  count: np.ndarray            # (Q,) same-id gallery items
  num_matches: np.ndarray      # (Q,) same-id gallery items left in the ranking
  q_camids: Optional[np.ndarray] = None
  g_camids: Optional[np.ndarray] = None

  @property
  def num_queries(self) -> int:
    return len(self.count)

  @property
  def num_gallery(self) -> int:
    return len(self.gallery_by_id)

  def padded(self, rows: np.ndarray, width: int) -> np.ndarray:
    """(len(rows), width) same-id gallery indices (ascending) of queries `rows`; padding = num_gallery."""
    slot = np.arange(width)
    position = np.minimum(self.start[rows, None] + slot, self.num_gallery - 1)
    return np.where(slot < self.count[rows, None], self.gallery_by_id[position], self.num_gallery)

  def removed(self, rows: np.ndarray, gallery_index: np.ndarray) -> np.ndarray:
    """Which same-id items `gallery_index` (padding allowed) share their query's camera."""
    if self.q_camids is None:
      return np.zeros(gallery_index.shape, bool)
    real = gallery_index < self.num_gallery
    return real & (self.g_camids[np.where(real, gallery_index, 0)] == self.q_camids[rows, None])


def same_id_table(q_pids: Array, g_pids: Array, q_camids: Optional[Array] = None,
                  g_camids: Optional[Array] = None) -> SameIdTable:
  """Validate the labels and index the gallery by id, so each query's same-id items are one slice."""
  q_pids, g_pids = _labels("q_pids", q_pids), _labels("g_pids", g_pids)
  if (q_camids is None) != (g_camids is None):
    raise ValueError("q_camids, g_camids: give both (body protocol) or neither (hand protocol)")
  if len(g_pids) == 0:
    raise ValueError("g_pids: the gallery is empty")
  ids, dense = np.unique(np.concatenate([q_pids, g_pids]), return_inverse=True)
  q_id, g_id = dense[:len(q_pids)], dense[len(q_pids):]
  per_id = np.bincount(g_id, minlength=len(ids))
  count = per_id[q_id]
  start = (np.cumsum(per_id) - per_id)[q_id]
  table = SameIdTable(np.argsort(g_id, kind="stable"), start, count, count)
  if q_camids is None:
    return table
  q_camids = _labels("q_camids", q_camids, len(q_pids))
  g_camids = _labels("g_camids", g_camids, len(g_pids))
  cams, cam = np.unique(np.concatenate([q_camids, g_camids]), return_inverse=True)
  pair = dense * len(cams) + cam  # one integer per (id, camera)
  same_camera = np.bincount(pair[len(q_pids):], minlength=len(ids) * len(cams))[pair[:len(q_pids)]]
  return dataclasses.replace(table, num_matches=count - same_camera, q_camids=q_camids, g_camids=g_camids)


@functools.partial(jax.jit, static_argnames="num_groups")
def _precedence_codes(dist: jax.Array, same_idx: jax.Array, num_groups: int):
  """Sort each query's same-id items by (distance, index); code every item by how many of them it follows.

  With t_j, g_j the sorted same-id distances and gallery indices (NaN, num_g = padding), item k gets
  u_k = #{j : (t_j, g_j) < (d_k, k)} in lexicographic order, i.e. the number of same-id items ranked
  before it; NaN distances get m + 1. Codes are offset by row * (m + 2) so rows own disjoint bins.
  Only the first `num_groups` * _GROUP sorted items are compared: the rest must be padding.
  """
  num_q, num_g = dist.shape
  m = same_idx.shape[1]
  real = same_idx < num_g
  t = jnp.take_along_axis(dist, jnp.where(real, same_idx, 0), axis=1)
  # -0.0 -> 0.0: the sort must agree with `==`, which does not tell them apart.
  t = jnp.where(real, jnp.where(t == 0, jnp.zeros_like(t), t), jnp.nan)
  t, gallery_index = lax.sort((t, same_idx), dimension=1, num_keys=2)
  d = dist[:, :, None]
  k = jnp.arange(num_g, dtype=jnp.int32)[None, :, None]
  u = jnp.zeros(dist.shape, jnp.int32)
  # Unrolled (one compile per group count): a fori_loop would carry u through memory, ~1.7x slower on CPU.
  for lo in range(0, num_groups * _GROUP, _GROUP):
    tj, gj = t[:, None, lo:lo + _GROUP], gallery_index[:, None, lo:lo + _GROUP]
    u = u + ((tj < d) | ((tj == d) & (gj < k))).sum(-1, dtype=jnp.int32)
  code = jnp.where(jnp.isnan(dist), m + 1, u)
  return gallery_index, code + (jnp.arange(num_q, dtype=jnp.int32) * (m + 2))[:, None]


@functools.partial(jax.jit, static_argnames="num_bins")
def _histogram(codes: jax.Array, num_bins: int) -> jax.Array:
  """Counts of each code in [0, num_bins)."""
  return jax.ops.segment_sum(jnp.ones(codes.size, jnp.int32), codes.reshape(-1), num_segments=num_bins)


def match_ranks(dist: Array, same_idx: np.ndarray, removed_fn: Callable[[np.ndarray], np.ndarray]):
  """Ranks (0-based, among the items left in the ranking) of each query's same-id items.

  `dist` (n, G) holds n queries' distances, `same_idx` (n, m) their same-id gallery indices padded with
  G, and `removed_fn(gallery_index)` flags the items removed from the ranking. Returns (ranks, is_match),
  both (n, m), the ranks ascending along each row where is_match.
  """
  num_q, m = same_idx.shape
  if m % _GROUP:
    raise ValueError(f"same_idx: expected a width that is a multiple of {_GROUP}, got {m}")
  count = int((same_idx < dist.shape[1]).sum(1).max(initial=0))
  # Two executables, not one: compiled together, XLA:CPU evaluated the codes inside the scatter loop
  # and ran several times slower.
  gallery_index, codes = _precedence_codes(dist, same_idx, num_groups=-(-count // _GROUP))
  hist = _histogram(codes, num_bins=num_q * (m + 2))
  gallery_index, hist = jax.device_get((gallery_index, hist.reshape(num_q, m + 2)))
  if hist[:, -1].any():
    raise ValueError(f"distmat: NaN distances in {int((hist[:, -1] > 0).sum())} query row(s)")
  # The same-id keys are sorted and distinct, so u_k <= j exactly when item k's key is at most item j's:
  # #{u <= j} counts item j and the items ranked before it.
  before = np.cumsum(hist[:, :m], axis=1) - 1
  removed = removed_fn(gallery_index)
  ranks = before - (np.cumsum(removed, axis=1) - removed)
  return ranks, (gallery_index < dist.shape[1]) & ~removed


def _query_scores(ranks: np.ndarray, is_match: np.ndarray) -> dict:
  """Per-query first-match rank, trapezoidal and step AP, and INP from ascending match ranks."""
  n = is_match.sum(1)
  nth = np.cumsum(is_match, axis=1) - 1
  r = ranks.astype(np.float64)
  precision = (nth + 1) / (r + 1)
  # Original Market-1501 code: the i-th hit at rank r adds ((i / r, or 1 at r = 0) + (i+1)/(r+1)) / 2.
  previous = np.where(r > 0, nth / np.maximum(r, 1), 1.0)
  last = np.where(is_match, ranks, -1).max(1)
  return {
      "first_rank": np.where(is_match, ranks, np.iinfo(np.int64).max).min(1),
      "ap": np.where(is_match, (previous + precision) / 2, 0).sum(1) / n,
      "ap_step": np.where(is_match, precision, 0).sum(1) / n,
      "inp": n / (last + 1),
      "num_matches": n,
  }


def _chunk_rows(query_chunk: Optional[int], num_gallery: int) -> int:
  """Queries per chunk: `query_chunk`, or by default as many as keep a chunk near _CHUNK_ELEMENTS."""
  if query_chunk is None:
    return max(1, _CHUNK_ELEMENTS // num_gallery)
  if isinstance(query_chunk, bool) or not isinstance(query_chunk, (int, np.integer)) or query_chunk < 1:
    raise ValueError(f"query_chunk: expected a positive integer or None, got {query_chunk!r}")
  return int(query_chunk)


def query_metrics_from_chunks(chunk_distances: Callable[[np.ndarray], Array], table: SameIdTable,
                              query_chunk: Optional[int] = None) -> dict:
  """Per-query metrics, fetching distances for one chunk of query rows at a time: `chunk_distances(rows)`.

  Skipped queries (no match) get first_rank -1 and NaN scores. Queries go in order of their same-id
  count, so a chunk compares with little padding; all chunks have one shape, so the kernels compile once
  per number of same-id groups.
  """
  num_q = table.num_queries
  out = {"first_rank": np.full(num_q, -1, np.int64), "ap": np.full(num_q, np.nan),
         "ap_step": np.full(num_q, np.nan), "inp": np.full(num_q, np.nan),
         "num_matches": np.zeros(num_q, np.int64)}
  todo = np.flatnonzero(table.num_matches > 0)
  if len(todo) == 0:
    return out
  todo = todo[np.argsort(table.count[todo], kind="stable")]
  size = min(_chunk_rows(query_chunk, table.num_gallery), len(todo))
  width = -(-int(table.count[todo[-1]]) // _GROUP) * _GROUP
  for lo in range(0, len(todo), size):
    rows = todo[lo:lo + size]
    padded_rows = np.pad(rows, (0, size - len(rows)), mode="edge")
    same_idx = table.padded(padded_rows, width)
    same_idx[len(rows):] = table.num_gallery
    ranks, is_match = match_ranks(chunk_distances(padded_rows), same_idx,
                                  lambda g: table.removed(padded_rows, g))
    for key, value in _query_scores(ranks[:len(rows)], is_match[:len(rows)]).items():
      out[key][rows] = value
  return out


def _check_distmat(distmat: Array, table: SameIdTable) -> None:
  shape = (table.num_queries, table.num_gallery)
  if getattr(distmat, "ndim", None) != 2 or tuple(distmat.shape) != shape:
    raise ValueError(f"distmat: expected shape (num_queries, num_gallery) = {shape} from the labels, "
                     f"got {getattr(distmat, 'shape', type(distmat).__name__)}")
  if not jnp.issubdtype(distmat.dtype, jnp.floating):
    raise ValueError(f"distmat: expected floating-point distances, got dtype {distmat.dtype}")


class _HostRows:
  """Copies rows of a host distance matrix into one reused, 64-byte-aligned float32 buffer.

  JAX on CPU reads such a buffer in place instead of copying it again (a plain NumPy array is copied, at
  a fraction of memcpy speed). Reuse is safe: each chunk's results are fetched before the next copy.
  """

  def __init__(self, distmat: np.ndarray):
    self.distmat = distmat
    self.buffer: Optional[np.ndarray] = None

  def __call__(self, rows: np.ndarray) -> jax.Array:
    shape = (len(rows), self.distmat.shape[1])
    if self.buffer is None or self.buffer.shape != shape:
      self.buffer = _aligned_empty(shape)
    if self.distmat.dtype == np.float32:
      np.take(self.distmat, rows, axis=0, out=self.buffer, mode="clip")  # "raise" buffers `out`
    else:
      self.buffer[...] = self.distmat[rows]
    return jax.device_put(self.buffer)


def _aligned_empty(shape: tuple) -> np.ndarray:
  """An uninitialised float32 array whose data starts on a 64-byte boundary."""
  size = int(np.prod(shape))
  raw = np.empty(size + 16, np.float32)
  offset = (-raw.ctypes.data % 64) // 4
  return raw[offset:offset + size].reshape(shape)


def _row_getter(distmat: Array) -> Callable[[np.ndarray], jax.Array]:
  """rows -> float32 distance rows on the array's device (the default device for NumPy input)."""
  if isinstance(distmat, jax.Array):
    return lambda rows: distmat[jnp.asarray(rows)].astype(jnp.float32)
  return _HostRows(np.asarray(distmat))


def query_metrics(distmat: Array, q_pids: Array, g_pids: Array, q_camids: Optional[Array] = None,
                  g_camids: Optional[Array] = None, *, query_chunk: Optional[int] = None) -> dict:
  """Per-query first_rank, ap (trapezoidal), ap_step, inp and num_matches (-1 / NaN when skipped)."""
  table = same_id_table(q_pids, g_pids, q_camids, g_camids)
  _check_distmat(distmat, table)
  return query_metrics_from_chunks(_row_getter(distmat), table, query_chunk)


def aggregate(per_query: dict, max_rank: int = 50) -> dict:
  """CMC to `max_rank`, mAP, mAP_step and mINP averaged over the queries that have a match."""
  if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
    raise ValueError(f"max_rank: expected a positive integer, got {max_rank!r}")
  valid = per_query["first_rank"] >= 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("no query has a match in the gallery: check the ids (and cameras) of query and gallery")
  first = per_query["first_rank"][valid]
  hits = np.bincount(first[first < max_rank], minlength=max_rank)
  return {
      "cmc": np.cumsum(hits) / num_valid,
      "mAP": float(per_query["ap"][valid].mean()),
      "mAP_step": float(per_query["ap_step"][valid].mean()),
      "mINP": float(per_query["inp"][valid].mean()),
      "num_valid_queries": num_valid,
      "num_queries": len(valid),
  }


def evaluate_ranking(distmat: Array, q_pids: Array, g_pids: Array, q_camids: Optional[Array] = None,
                     g_camids: Optional[Array] = None, max_rank: int = 50, *,
                     query_chunk: Optional[int] = None) -> dict:
  """CMC (length max_rank), mAP (trapezoidal), mAP_step, mINP and num_valid_queries of a distance matrix.

  `distmat` (Q, G): smaller = more similar, NumPy or JAX (ranked in float32, on the array's device).
  """
  return aggregate(query_metrics(distmat, q_pids, g_pids, q_camids, g_camids, query_chunk=query_chunk),
                   max_rank)


@jax.jit
def cosine_distance(qf: jax.Array, gf: jax.Array) -> jax.Array:
  """1 - qf·gfᵀ: the cosine distance of L2-normalised features (full float32 matmul on every backend)."""
  return 1 - jnp.dot(qf, gf.T, precision=lax.Precision.HIGHEST)


def _features(name: str, values: Array, rows: int) -> jax.Array:
  """(rows, D) float32 features on the default device, or a ValueError naming `name`."""
  if getattr(values, "ndim", None) != 2 or values.shape[0] != rows:
    raise ValueError(f"{name}: expected ({rows}, D) features (one row per label), "
                     f"got shape {getattr(values, 'shape', None)}")
  return jnp.asarray(values, jnp.float32)


def evaluate_features(qf: Array, gf: Array, q_pids: Array, g_pids: Array, q_camids: Optional[Array] = None,
                      g_camids: Optional[Array] = None, *, max_rank: int = 50, query_chunk: int = 512,
                      rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      per_query: Optional[dict] = None) -> dict:
  """`evaluate_ranking` of the cosine distances (or the k-reciprocal re-ranked ones) of L2-normalised features.

  Distances are formed on the device for `query_chunk` queries at a time and ranked there: the full
  distance matrix never exists on the host. A `per_query` dict is filled with the per-query arrays
  (first_rank, ap, ap_step, inp, num_matches; -1 / NaN for queries without a match).
  """
  table = same_id_table(q_pids, g_pids, q_camids, g_camids)
  qf, gf = _features("qf", qf, table.num_queries), _features("gf", gf, table.num_gallery)
  if qf.shape[1] != gf.shape[1]:
    raise ValueError(f"qf, gf: feature sizes differ ({qf.shape[1]} vs {gf.shape[1]})")
  reranker = rerank_lib.k_reciprocal(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value) if rerank else None

  def chunk_distances(rows: np.ndarray) -> jax.Array:
    if reranker is not None:
      return jnp.asarray(reranker.distances(rows))
    return cosine_distance(qf[rows], gf)

  scores = query_metrics_from_chunks(chunk_distances, table, query_chunk)
  if per_query is not None:
    per_query.update(scores)
  return aggregate(scores, max_rank)


def summarize(metrics: dict) -> dict:
  """JSON-ready floats: rank1/rank5/rank10 (those within max_rank), mAP, mAP_step, mINP (fractions)."""
  cmc = np.asarray(metrics["cmc"])
  out = {f"rank{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)}
  out.update({key: float(metrics[key]) for key in ("mAP", "mAP_step", "mINP")})
  out["num_valid_queries"] = int(metrics["num_valid_queries"])
  return out


def evaluate_draws(features: Array, pids: Array, draws: Sequence[Tuple[Array, Array]],
                   camids: Optional[Array] = None, **kwargs) -> dict:
  """Metrics of each (query_indices, gallery_indices) draw over one feature set, and their mean.

  `features` (N, D) and `pids` (N,) (and `camids`, for the body protocol) cover every test image; the
  draws index them (the hand sets' 10 seeded query/gallery splits). `kwargs` go to `evaluate_features`.
  Returns {"mean": ..., "std": ..., "num_draws": n, "draws": [summary per draw]}, JSON-ready, and
  "per_query": the first draw's per-query arrays (`evaluate_features`), NumPy.
  """
  if len(draws) == 0:
    raise ValueError("draws: expected at least one (query_indices, gallery_indices) pair")
  features = np.asarray(features)
  pids = _labels("pids", pids, len(features))
  camids = None if camids is None else _labels("camids", camids, len(features))
  results, first_draw = [], {}
  for number, (query, gallery) in enumerate(draws):
    query, gallery = np.asarray(query), np.asarray(gallery)
    for name, idx in (("query", query), ("gallery", gallery)):
      if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.size == 0 or \
          idx.min() < 0 or idx.max() >= len(features):
        raise ValueError(f"draws[{number}]: {name} indices must be a non-empty 1-D integer array in "
                         f"[0, {len(features)})")
    cams = (None, None) if camids is None else (camids[query], camids[gallery])
    results.append(summarize(evaluate_features(features[query], features[gallery], pids[query], pids[gallery],
                                               *cams, per_query=first_draw if number == 0 else None, **kwargs)))
  keys = [key for key in results[0] if key != "num_valid_queries"]
  return {"mean": {key: float(np.mean([r[key] for r in results])) for key in keys},
          "std": {key: float(np.std([r[key] for r in results])) for key in keys},
          "num_draws": len(results), "draws": results, "per_query": first_draw}
