"""Ranking metrics: the author's fixture, hand-worked cases, and agreement with a naive per-query loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from laga_jax.evaluation import metrics


def naive_query_metrics(distmat, q_pids, g_pids, q_camids=None, g_camids=None):
  """Reference: per query, a stable argsort, removal of same-id same-camera items, then the definitions."""
  out = {"first_rank": [], "ap": [], "ap_step": [], "inp": [], "num_matches": []}
  for i in range(len(q_pids)):
    order = np.argsort(distmat[i], kind="stable")
    keep = np.ones(len(order), bool)
    if q_camids is not None:
      keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
    hits = np.flatnonzero((g_pids[order] == q_pids[i])[keep])
    if len(hits) == 0:
      for key, skipped in (("first_rank", -1), ("ap", np.nan), ("ap_step", np.nan), ("inp", np.nan),
                           ("num_matches", 0)):
        out[key].append(skipped)
      continue
    nth = np.arange(len(hits))
    precision = (nth + 1) / (hits + 1)
    previous = np.array([1.0 if r == 0 else i / r for i, r in zip(nth, hits)])
    out["first_rank"].append(hits[0])
    out["ap"].append(np.mean((previous + precision) / 2))
    out["ap_step"].append(np.mean(precision))
    out["inp"].append(len(hits) / (hits[-1] + 1))
    out["num_matches"].append(len(hits))
  return {key: np.asarray(value) for key, value in out.items()}


def assert_same(per_query, expected):
  np.testing.assert_array_equal(per_query["first_rank"], expected["first_rank"])
  np.testing.assert_array_equal(per_query["num_matches"], expected["num_matches"])
  for key in ("ap", "ap_step", "inp"):
    np.testing.assert_allclose(per_query[key], expected[key], rtol=1e-12, atol=0, err_msg=key)


def random_case(rng, num_q, num_g, num_ids, num_cams, levels):
  q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
  # Few distinct levels force many ties.
  distmat = (rng.integers(0, levels, (num_q, num_g)) / levels).astype(np.float32)
  return distmat, q_pids, g_pids, q_cams, g_cams


# --- the author's routine (fixture) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def author(fixtures_dir):
  return np.load(fixtures_dir / "laga_eval_metrics.npz")


def _case(author, name):
  return {key.split(".", 1)[1]: author[key] for key in author.files if key.startswith(name + ".")}


def test_fixture_single_shot(author):
  case = _case(author, "single_shot")
  distmat = np.asarray(metrics.cosine_distance(case["query_features"], case["gallery_features"]))
  num_g = len(case["gallery_labels"])
  per_query = metrics.query_metrics(distmat, case["query_labels"], case["gallery_labels"])
  np.testing.assert_allclose(per_query["ap"], case["ap_per_query"], rtol=1e-6)
  result = metrics.evaluate_ranking(distmat, case["query_labels"], case["gallery_labels"], max_rank=num_g)
  assert result["num_valid_queries"] == len(case["query_labels"])
  np.testing.assert_allclose(result["cmc"], case["cmc"], rtol=1e-6)
  np.testing.assert_allclose(result["mAP"], case["mAP"], rtol=1e-6)


def test_fixture_multi_positive_skips_the_query_without_match(author):
  """The author divides by every query (a skipped one adds 0); this project averages over valid ones only."""
  case = _case(author, "multi_positive")
  distmat = np.asarray(metrics.cosine_distance(case["query_features"], case["gallery_features"]))
  labels = case["query_labels"], case["gallery_labels"]
  per_query = metrics.query_metrics(distmat, *labels)
  valid = per_query["first_rank"] >= 0
  np.testing.assert_array_equal(valid, np.isin(labels[0], labels[1]))
  assert not valid[list(labels[0]).index(9)]
  np.testing.assert_allclose(per_query["ap"][valid], case["ap_per_query"][valid], rtol=1e-6)
  assert case["ap_per_query"][~valid] == 0
  result = metrics.evaluate_ranking(distmat, *labels, max_rank=len(labels[1]))
  num_q, num_valid = len(labels[0]), result["num_valid_queries"]
  assert (num_q, num_valid) == (5, 4)
  np.testing.assert_allclose(result["mAP"], case["ap_per_query"][valid].mean(), rtol=1e-6)
  # Recomputed with the author's divisor, the fixture comes back.
  np.testing.assert_allclose(result["mAP"] * num_valid / num_q, case["mAP"], rtol=1e-6)
  np.testing.assert_allclose(result["cmc"] * num_valid / num_q, case["cmc"], rtol=1e-6)


def test_evaluate_features_reproduces_fixture(author):
  case = _case(author, "single_shot")
  result = metrics.evaluate_features(case["query_features"], case["gallery_features"], case["query_labels"],
                                     case["gallery_labels"], max_rank=16, query_chunk=5)
  np.testing.assert_allclose(result["mAP"], case["mAP"], rtol=1e-6)
  np.testing.assert_allclose(result["cmc"], case["cmc"], rtol=1e-6)


# --- hand-worked cases --------------------------------------------------------------------------------


def test_ties_keep_gallery_order():
  # Every distance equal: the stable order is the gallery order, so the matches sit at ranks 1 and 3.
  distmat = np.full((1, 5), 0.5, np.float32)
  per_query = metrics.query_metrics(distmat, [7], [3, 7, 4, 7, 5])
  assert per_query["first_rank"][0] == 1
  np.testing.assert_allclose(per_query["ap_step"][0], (1 / 2 + 2 / 4) / 2)
  # Trapezoidal: hit i at rank r adds ((i / r) + (i + 1) / (r + 1)) / 2, i / r read as 1 only at r = 0.
  np.testing.assert_allclose(per_query["ap"][0], ((0 / 1 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
  np.testing.assert_allclose(per_query["inp"][0], 2 / 4)


def test_ties_with_non_matches_and_signed_zero():
  distmat = np.array([[0.0, -0.0, 0.0, 1.0, -0.0]], np.float32)
  per_query = metrics.query_metrics(distmat, [1], [2, 1, 2, 2, 1])
  expected = naive_query_metrics(distmat, np.array([1]), np.array([2, 1, 2, 2, 1]))
  assert_same(per_query, expected)
  assert per_query["first_rank"][0] == 1  # -0.0 == 0.0: gallery order decides


def test_hand_single_shot_gallery():
  # Hand protocol, one gallery image per id: AP_step = 1 / (r + 1), trapezoidal AP = 1 / (2 (r + 1)).
  distmat = np.array([[0.1, 0.2, 0.3, 0.4],     # match (id 12) at rank 2
                      [0.9, 0.2, 0.3, 0.4]],    # match (id 10) at rank 3
                     np.float32)
  result = metrics.evaluate_ranking(distmat, [12, 10], [10, 11, 12, 13], max_rank=4)
  per_query = metrics.query_metrics(distmat, [12, 10], [10, 11, 12, 13])
  np.testing.assert_array_equal(per_query["first_rank"], [2, 3])
  np.testing.assert_allclose(per_query["ap_step"], [1 / 3, 1 / 4])
  np.testing.assert_allclose(per_query["ap"], [1 / 6, 1 / 8])
  np.testing.assert_allclose(result["cmc"], [0, 0, 0.5, 1])
  np.testing.assert_allclose(result["mINP"], (1 / 3 + 1 / 4) / 2)


def test_same_id_same_camera_removed_and_distractors_kept():
  # Gallery: [id 5 cam 0, id 0 cam 1 (distractor), id 5 cam 1, id 9 cam 0]; query id 5 in camera 0.
  distmat = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
  args = ([5], [5, 0, 5, 9], [0], [0, 1, 1, 0])
  per_query = metrics.query_metrics(distmat, *args)
  # Item 0 is removed (same id, same camera); the distractor stays ahead of the match: rank 1.
  assert per_query["first_rank"][0] == 1 and per_query["num_matches"][0] == 1
  np.testing.assert_allclose(per_query["ap"][0], (0 / 1 + 1 / 2) / 2)
  # Without cameras (hand protocol) the same item is a match at rank 0.
  assert metrics.query_metrics(distmat, [5], [5, 0, 5, 9])["first_rank"][0] == 0


def test_skipped_queries_count_in_no_average():
  distmat = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.4]], np.float32)
  # Query 1: id absent; query 2: its only same-id item shares its camera.
  result = metrics.evaluate_ranking(distmat, [1, 2, 3], [1, 3], [0, 0, 1], [1, 1], max_rank=2)
  assert result["num_valid_queries"] == 1 and result["num_queries"] == 3
  np.testing.assert_allclose(result["cmc"], [1, 1])
  assert result["mAP"] == result["mAP_step"] == result["mINP"] == 1


def test_cmc_longer_than_gallery_reaches_one():
  result = metrics.evaluate_ranking(np.array([[0.3, 0.1]], np.float32), [1], [1, 2], max_rank=5)
  np.testing.assert_allclose(result["cmc"], [0, 1, 1, 1, 1])


# --- agreement with the naive loop --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cameras", [True, False])
def test_agrees_with_naive_loop(seed, cameras):
  rng = np.random.default_rng(seed)
  distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 23, 97, 6 + 4 * seed, 3, [4, 50, 1000, 10**6][seed])
  cams = (q_cams, g_cams) if cameras else (None, None)
  expected = naive_query_metrics(distmat, q_pids, g_pids, *cams)
  for chunk in (1, 4, None):
    assert_same(metrics.query_metrics(distmat, q_pids, g_pids, *cams, query_chunk=chunk), expected)


def test_many_same_id_items_span_several_compare_groups():
  rng = np.random.default_rng(7)
  # 2 ids over 120 gallery items: ~60 same-id items per query, several compare groups.
  distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 9, 120, 2, 4, 30)
  expected = naive_query_metrics(distmat, q_pids, g_pids, q_cams, g_cams)
  assert expected["num_matches"].max() > 48
  assert_same(metrics.query_metrics(distmat, q_pids, g_pids, q_cams, g_cams, query_chunk=2), expected)


def test_chunked_equals_unchunked_metrics():
  rng = np.random.default_rng(3)
  distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 40, 150, 10, 4, 10**6)
  whole = metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, query_chunk=40)
  for chunk in (1, 7, None):
    part = metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, query_chunk=chunk)
    np.testing.assert_array_equal(part["cmc"], whole["cmc"])
    assert part["mAP"] == whole["mAP"] and part["mINP"] == whole["mINP"]


def test_jax_and_float64_inputs_give_the_same_numbers():
  rng = np.random.default_rng(11)
  distmat, q_pids, g_pids, q_cams, g_cams = random_case(rng, 12, 60, 5, 3, 100)
  host = metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)
  for other in (jnp.asarray(distmat), distmat.astype(np.float64)):
    result = metrics.evaluate_ranking(other, jnp.asarray(q_pids), g_pids, q_cams, g_cams)
    np.testing.assert_array_equal(result["cmc"], host["cmc"])
    assert result["mAP"] == host["mAP"] and result["mAP_step"] == host["mAP_step"]


def test_infinite_distances_rank_last():
  distmat = np.array([[np.inf, 0.5, np.inf, -np.inf]], np.float32)
  g_pids = np.array([1, 2, 1, 2])
  assert_same(metrics.query_metrics(distmat, [1], g_pids), naive_query_metrics(distmat, np.array([1]), g_pids))


@pytest.mark.parametrize("cameras", [True, False])
def test_evaluate_features_equals_evaluate_ranking_on_cosine_distance(cameras):
  rng = np.random.default_rng(5)
  qf, gf = rng.normal(size=(30, 16)), rng.normal(size=(80, 16))
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  q_pids, g_pids = rng.integers(0, 8, 30), rng.integers(0, 8, 80)
  cams = (rng.integers(0, 3, 30), rng.integers(0, 3, 80)) if cameras else (None, None)
  expected = metrics.evaluate_ranking(np.asarray(metrics.cosine_distance(qf, gf)), q_pids, g_pids, *cams)
  got = metrics.evaluate_features(qf, gf, q_pids, g_pids, *cams, query_chunk=7)
  np.testing.assert_array_equal(got["cmc"], expected["cmc"])
  for key in ("mAP", "mAP_step", "mINP", "num_valid_queries"):
    assert got[key] == expected[key], key


# --- results helpers ----------------------------------------------------------------------------------


def test_summarize_is_json_ready():
  result = metrics.evaluate_ranking(np.array([[0.2, 0.1, 0.3]], np.float32), [1], [1, 2, 3], max_rank=10)
  summary = metrics.summarize(result)
  assert summary == {"rank1": 0.0, "rank5": 1.0, "rank10": 1.0, "mAP": 0.25, "mAP_step": 0.5,
                     "mINP": 0.5, "num_valid_queries": 1}
  assert all(type(v) in (float, int) for v in summary.values())
  assert "rank10" not in metrics.summarize(metrics.evaluate_ranking(np.zeros((1, 3), np.float32), [1], [1, 2, 3],
                                                                    max_rank=5))


def test_evaluate_draws_means_per_draw_results():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(40, 8))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  pids = np.repeat(np.arange(10), 4)
  draws = []
  for seed in range(3):
    gallery = np.sort([np.random.default_rng(seed).choice(np.flatnonzero(pids == p)) for p in range(10)])
    draws.append((np.setdiff1d(np.arange(40), gallery), gallery))
  out = metrics.evaluate_draws(features, pids, draws, max_rank=10)
  assert out["num_draws"] == 3 and len(out["draws"]) == 3
  for draw, (query, gallery) in zip(out["draws"], draws):
    single = metrics.summarize(metrics.evaluate_features(features[query], features[gallery], pids[query],
                                                         pids[gallery], max_rank=10))
    assert draw == single
  for key in ("rank1", "rank5", "rank10", "mAP", "mAP_step", "mINP"):
    np.testing.assert_allclose(out["mean"][key], np.mean([d[key] for d in out["draws"]]))
  with pytest.raises(ValueError, match="draws"):
    metrics.evaluate_draws(features, pids, [(np.arange(3), np.array([40]))])


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_input_is_named():
  d = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match=r"distmat: expected shape .*\(2, 3\)"):
    metrics.evaluate_ranking(np.zeros((3, 2), np.float32), [1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="q_camids, g_camids"):
    metrics.evaluate_ranking(d, [1, 2], [1, 2, 3], q_camids=[0, 0])
  with pytest.raises(ValueError, match="g_camids: expected 3 entries"):
    metrics.evaluate_ranking(d, [1, 2], [1, 2, 3], [0, 0], [0, 1])
  with pytest.raises(ValueError, match="q_pids: expected a 1-D integer array"):
    metrics.evaluate_ranking(d, [1.5, 2.0], [1, 2, 3])
  with pytest.raises(ValueError, match="distmat: NaN"):
    metrics.evaluate_ranking(np.array([[0.1, np.nan, 0.3], [0, 0, 0]], np.float32), [1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="no query has a match"):
    metrics.evaluate_ranking(d, [7, 8], [1, 2, 3])
  with pytest.raises(ValueError, match="max_rank"):
    metrics.evaluate_ranking(d, [1, 2], [1, 2, 3], max_rank=0)
  with pytest.raises(ValueError, match="query_chunk"):
    metrics.evaluate_ranking(d, [1, 2], [1, 2, 3], query_chunk=0)
  with pytest.raises(ValueError, match="gf: expected"):
    metrics.evaluate_features(np.zeros((2, 4)), np.zeros((2, 4)), [1, 2], [1, 2, 3])
