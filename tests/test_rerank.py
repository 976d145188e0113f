"""k-reciprocal re-ranking against a direct dense NumPy implementation of the same definition."""

import numpy as np
import pytest

from laga_jax.evaluation import metrics, rerank


def dense_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
  """The widely used re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda) (Zhong et al.), dense N×N.

  Transcribed as published; the only change is a stable argsort (the published one does not fix tie order).
  """
  original_dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                  np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
  original_dist = np.power(original_dist, 2).astype(np.float32)
  original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
  V = np.zeros_like(original_dist).astype(np.float32)
  initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
  query_num = q_g_dist.shape[0]
  all_num = q_g_dist.shape[0] + q_g_dist.shape[1]
  half = int(np.around(k1 / 2.))
  for i in range(all_num):
    forward = initial_rank[i, :k1 + 1]
    backward = initial_rank[forward, :k1 + 1]
    k_reciprocal_index = forward[np.where(backward == i)[0]]
    expansion = k_reciprocal_index
    for candidate in k_reciprocal_index:
      c_forward = initial_rank[candidate, :half + 1]
      c_backward = initial_rank[c_forward, :half + 1]
      c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
      if len(np.intersect1d(c_reciprocal, k_reciprocal_index)) > 2. / 3 * len(c_reciprocal):
        expansion = np.append(expansion, c_reciprocal)
    expansion = np.unique(expansion)
    weight = np.exp(-original_dist[i, expansion])
    V[i, expansion] = 1. * weight / np.sum(weight)
  original_dist = original_dist[:query_num]
  if k2 != 1:
    V_qe = np.zeros_like(V, dtype=np.float32)
    for i in range(all_num):
      V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
    V = V_qe
  inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
  jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
    nonzero = np.where(V[i, :] != 0)[0]
    for j in nonzero:
      temp_min[0, inv_index[j]] += np.minimum(V[i, j], V[inv_index[j], j])
    jaccard_dist[i] = 1 - temp_min / (2. - temp_min)
  final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
  return final_dist[:query_num, query_num:]


def clustered_features(seed, num_q, num_g, dim, num_ids=12):
  """Unit features around a few centres (so neighbour sets overlap), and their ids."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_ids, dim))
  q_ids, g_ids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  qf = centres[q_ids] + 0.6 * rng.normal(size=(num_q, dim))
  gf = centres[g_ids] + 0.6 * rng.normal(size=(num_g, dim))
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
  return unit(qf), unit(gf), q_ids, g_ids


def euclidean(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0))


@pytest.mark.parametrize("num_q, num_g, dim, k1, k2, lam", [
    (15, 60, 8, 20, 6, 0.3),     # the paper's parameters
    (30, 90, 16, 10, 3, 0.5),
    (7, 40, 4, 5, 1, 0.0),       # k2 = 1: no query expansion; λ = 0: Jaccard only
])
def test_matches_dense_reference(num_q, num_g, dim, k1, k2, lam):
  qf, gf, _, _ = clustered_features(num_q + num_g, num_q, num_g, dim)
  expected = dense_re_ranking(euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf), k1, k2, lam)
  got = rerank.re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam)
  assert got.shape == (num_q, num_g) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_sparse_state_and_query_chunks():
  qf, gf, _, _ = clustered_features(1, 20, 70, 8)
  state = rerank.k_reciprocal(qf, gf, k1=8, k2=4)
  n = 90
  # V keeps at most (k2 x expanded-set) entries per row, never the N² of the reference.
  assert state.v.shape == (n, n) and state.v.nnz < n * n / 2
  np.testing.assert_allclose(np.asarray(state.v.sum(1)).ravel(), 1, rtol=1e-5)
  full = state.distances(np.arange(20))
  np.testing.assert_array_equal(state.distances(np.array([17, 3, 3])), full[[17, 3, 3]])


def test_evaluate_features_with_rerank_ranks_the_reranked_distances():
  qf, gf, q_ids, g_ids = clustered_features(2, 25, 80, 8)
  q_cams, g_cams = np.arange(25) % 3, np.arange(80) % 3
  expected = metrics.evaluate_ranking(rerank.re_ranking(qf, gf, k1=6, k2=3), q_ids, g_ids, q_cams, g_cams)
  got = metrics.evaluate_features(qf, gf, q_ids, g_ids, q_cams, g_cams, rerank=True, k1=6, k2=3,
                                  query_chunk=4)
  np.testing.assert_array_equal(got["cmc"], expected["cmc"])
  assert got["mAP"] == expected["mAP"]
  plain = metrics.evaluate_features(qf, gf, q_ids, g_ids, q_cams, g_cams)
  assert got["mAP"] != plain["mAP"]


def test_bad_parameters_are_named():
  qf, gf, _, _ = clustered_features(3, 4, 10, 4)
  with pytest.raises(ValueError, match="k1"):
    rerank.re_ranking(qf, gf, k1=0)
  with pytest.raises(ValueError, match="k1=20, k2=6"):
    rerank.re_ranking(qf, gf)            # 14 items < k1 + 1
  with pytest.raises(ValueError, match="lambda_value"):
    rerank.re_ranking(qf, gf, k1=3, k2=2, lambda_value=1.5)
  with pytest.raises(ValueError, match="qf, gf"):
    rerank.re_ranking(qf, gf[:, :3], k1=3, k2=2)
