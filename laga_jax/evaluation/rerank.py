"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from features, in bounded memory.

Same definition as the widely used `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)` fed
with Euclidean distances of the features: over all N = Q + G items, d(i, j) = ||f_i - f_j||² divided by
its row maximum; k-reciprocal sets R(i, k1) (i and j among each other's k1 + 1 nearest), expanded by each
R(c, round(k1 / 2)), c in R(i, k1), that shares more than 2/3 of its items with R(i, k1); V(i, ·) =
softmax of -d over the expanded set; V averaged over the k2 nearest items (query expansion); Jaccard
distance 1 - Σ min(V_i, V_j) / Σ max(V_i, V_j); final (1 - λ)·Jaccard + λ·d for (query, gallery) pairs.

The reference builds several N×N matrices. Here the distances come in row chunks of which only the
k1 + 1 nearest items are kept, V is a scipy.sparse matrix (a few hundred entries per row), the few
distances V needs beyond the neighbour lists are computed pair by pair, and the Jaccard term is formed
for a chunk of queries at a time from sparse rows: memory O(N·(k1 + nnz per row of V) + chunk·G).
"""

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from jax import lax

Array = Union[np.ndarray, jax.Array]
# Rows of the N×N distance matrix computed at once.
_ROW_CHUNK = 256
# Feature values gathered per batch of pair distances; (query, gallery, shared item) triples per batch.
_GATHER_ELEMENTS = 1 << 24
_TRIPLES = 1 << 23


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """||a_i - b_j||², clamped at 0 against rounding."""
  dots = jnp.dot(a, b.T, precision=lax.Precision.HIGHEST)
  return jnp.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * dots, 0)


@functools.partial(jax.jit, static_argnames="k")
def _nearest(features: jax.Array, rows: jax.Array, k: int):
  """The k nearest items of each row (ascending normalised distance, ties by index), and row maxima."""
  sq = _squared_distances(features[rows], features)
  row_max = sq.max(1)
  # Divide before selecting, as the reference does: the division can round distinct distances together.
  _, nearest = lax.top_k(-(sq / row_max[:, None]), k)
  return nearest, row_max


@jax.jit
def _pair_distances(features: jax.Array, rows: jax.Array, others: jax.Array) -> jax.Array:
  """||f[rows_i] - f[others_ij]||² for rows (n,) and others (n, m)."""
  a, b = features[rows], features[others]
  dots = jnp.einsum("nd,nmd->nm", a, b, precision=lax.Precision.HIGHEST)
  return jnp.maximum((a * a).sum(1)[:, None] + (b * b).sum(2) - 2 * dots, 0)


@functools.partial(jax.jit, static_argnames="num_queries")
def _query_distances(features: jax.Array, rows: jax.Array, num_queries: int, row_max: jax.Array):
  """Normalised d(query, gallery) for the query rows `rows`."""
  return _squared_distances(features[rows], features[num_queries:]) / row_max[:, None]


def _padded_batches(n: int, size: int):
  """(index array padded to `size` with its last entry, number of real entries) covering range(n)."""
  for lo in range(0, n, size):
    idx = np.arange(lo, min(lo + size, n))
    yield np.pad(idx, (0, size - len(idx)), mode="edge"), len(idx)


def _neighbours(features: jax.Array, k: int):
  """(N, k) nearest items of every item (itself included) and the (N,) maxima of its squared distances."""
  n = features.shape[0]
  nearest, row_max = np.empty((n, k), np.int64), np.empty(n, np.float32)
  size = min(_ROW_CHUNK, n)
  for idx, real in _padded_batches(n, size):
    got_nearest, got_max = jax.device_get(_nearest(features, jnp.asarray(idx), k))
    nearest[idx[:real]], row_max[idx[:real]] = got_nearest[:real], got_max[:real]
  return nearest, row_max


def _reciprocal(nearest: np.ndarray, k: int, items: np.ndarray) -> np.ndarray:
  """Whether each of `items` is among the k + 1 nearest of each of its own k + 1 nearest (any shape)."""
  first = nearest[:, :k + 1]
  return (first[first[items]] == items[..., None, None]).any(-1)


def _expanded_sets(nearest: np.ndarray, k1: int, lo: int, hi: int) -> np.ndarray:
  """Expanded k-reciprocal sets of items lo..hi-1: ascending unique indices, -1 in front as padding."""
  half = int(np.around(k1 / 2.0))
  own = np.where(_reciprocal(nearest, k1, np.arange(lo, hi)), nearest[lo:hi, :k1 + 1], -1)
  candidate = np.maximum(own, 0)
  theirs = np.where(_reciprocal(nearest, half, candidate), nearest[candidate, :half + 1], -1)
  theirs = np.where(own[..., None] >= 0, theirs, -1)
  shared = ((theirs[..., None] == own[:, None, None, :]) & (theirs[..., None] >= 0)).any(-1).sum(-1)
  accepted = shared > 2.0 / 3.0 * (theirs >= 0).sum(-1)
  merged = np.concatenate([own, np.where(accepted[..., None], theirs, -1).reshape(len(own), -1)], 1)
  merged.sort(axis=1)
  merged[:, 1:][merged[:, 1:] == merged[:, :-1]] = -1
  merged.sort(axis=1)
  width = int((merged >= 0).sum(1).max())
  return merged[:, merged.shape[1] - width:]


def _expansion_weights(features: jax.Array, row_max: np.ndarray, k1: int, nearest: np.ndarray):
  """The rows of V before query expansion: (N, N) CSR, softmax(-d) over each expanded set."""
  n = len(nearest)
  sets = [_expanded_sets(nearest, k1, lo, min(lo + 4096, n)) for lo in range(0, n, 4096)]
  width = max(s.shape[1] for s in sets)
  sets = np.concatenate([np.pad(s, ((0, 0), (width - s.shape[1], 0)), constant_values=-1) for s in sets])
  d = np.empty(sets.shape, np.float32)
  size = max(1, min(n, _GATHER_ELEMENTS // (width * features.shape[1])))
  for idx, real in _padded_batches(n, size):
    others = np.where(sets[idx] >= 0, sets[idx], idx[:, None])
    d[idx[:real]] = np.asarray(_pair_distances(features, jnp.asarray(idx), jnp.asarray(others)))[:real]
  weight = np.where(sets >= 0, np.exp(-d / row_max[:, None]), 0).astype(np.float32)
  weight /= weight.sum(1, keepdims=True)
  valid = sets >= 0
  rows = np.broadcast_to(np.arange(n)[:, None], sets.shape)[valid]
  return scipy.sparse.csr_matrix((weight[valid], (rows, sets[valid])), shape=(n, n))


def _shared_mass(v_rows: scipy.sparse.csr_matrix, v_gallery: scipy.sparse.csc_matrix) -> np.ndarray:
  """Σ_k min(v_rows[i, k], v_gallery[j, k]) for every (i, j): a join of the two on their shared k."""
  n, num_gallery = v_rows.shape[0], v_gallery.shape[0]
  row_of = np.repeat(np.arange(n), np.diff(v_rows.indptr))
  start = v_gallery.indptr[v_rows.indices]
  length = v_gallery.indptr[v_rows.indices + 1] - start
  total = int(length.sum())
  offset = np.cumsum(length) - length
  position = np.arange(total) - np.repeat(offset, length) + np.repeat(start, length)
  overlap = np.minimum(np.repeat(v_rows.data, length), v_gallery.data[position])
  cell = np.repeat(row_of, length) * num_gallery + v_gallery.indices[position]
  return np.bincount(cell, weights=overlap, minlength=n * num_gallery).reshape(n, num_gallery)


@dataclasses.dataclass(frozen=True)
class KReciprocal:
  """Everything re-ranking needs to produce any query rows of the re-ranked (query, gallery) distances."""
  features: jax.Array                   # (N, D): the queries, then the gallery
  num_queries: int
  row_max: np.ndarray                   # (N,) maxima of the squared distances per row
  v: scipy.sparse.csr_matrix            # (N, N) V after query expansion
  v_gallery: scipy.sparse.csc_matrix    # its gallery rows, by column
  lambda_value: float

  @property
  def num_gallery(self) -> int:
    return self.features.shape[0] - self.num_queries

  def distances(self, rows: np.ndarray) -> np.ndarray:
    """(len(rows), G) float32 re-ranked distances of the queries `rows`."""
    rows = np.asarray(rows)
    original = np.asarray(_query_distances(self.features, jnp.asarray(rows), self.num_queries,
                                           jnp.asarray(self.row_max[rows])))
    v_rows = self.v[rows]
    # Rows in groups of a bounded number of (query, gallery, shared item) triples.
    triples = np.diff(self.v_gallery.indptr)[v_rows.indices]
    per_row = np.diff(np.concatenate([[0], np.cumsum(triples)])[v_rows.indptr])
    group = np.cumsum(per_row) // _TRIPLES
    jaccard = np.empty(original.shape, np.float32)
    for g in np.unique(group):
      part = np.flatnonzero(group == g)
      shared = _shared_mass(v_rows[part], self.v_gallery)
      jaccard[part] = 1 - shared / (2 - shared)
    return ((1 - self.lambda_value) * jaccard + self.lambda_value * original).astype(np.float32)


def _check_inputs(qf: Array, gf: Array, k1: int, k2: int, lambda_value: float) -> None:
  """A ValueError naming the argument when features or parameters cannot work."""
  if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
    raise ValueError(f"qf, gf: expected (Q, D) and (G, D) features, got shapes {qf.shape} and {gf.shape}")
  for name, value in (("k1", k1), ("k2", k2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name}: expected a positive integer, got {value!r}")
  if k1 + 1 > qf.shape[0] + gf.shape[0] or k2 > k1 + 1:
    raise ValueError(f"k1={k1}, k2={k2}: need k2 <= k1 + 1 <= number of items ({qf.shape[0] + gf.shape[0]})")
  if not 0 <= lambda_value <= 1:
    raise ValueError(f"lambda_value: expected a number in [0, 1], got {lambda_value!r}")


def k_reciprocal(qf: Array, gf: Array, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> KReciprocal:
  """Neighbour lists, sparse V and query expansion for queries `qf` (Q, D) and gallery `gf` (G, D)."""
  _check_inputs(qf, gf, k1, k2, lambda_value)
  features = jnp.concatenate([jnp.asarray(qf, jnp.float32), jnp.asarray(gf, jnp.float32)])
  nearest, row_max = _neighbours(features, k1 + 1)
  v = _expansion_weights(features, row_max, k1, nearest)
  if k2 != 1:
    n = len(nearest)
    average = scipy.sparse.csr_matrix(
        (np.full(n * k2, 1.0 / k2, np.float32), (np.repeat(np.arange(n), k2), nearest[:, :k2].ravel())),
        shape=(n, n))
    v = (average @ v).tocsr()
  return KReciprocal(features, qf.shape[0], row_max, v, v[qf.shape[0]:].tocsc(), float(lambda_value))


def re_ranking(qf: Array, gf: Array, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
  """The whole (Q, G) re-ranked distance matrix (for large sets, use `KReciprocal.distances` by chunk)."""
  return k_reciprocal(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value).distances(np.arange(qf.shape[0]))
