"""Losses against the author-code fixture (float32, rtol 1e-6) and hand-worked cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from laga_jax import losses

RTOL = 1e-6  # fixtures/README.md: losses are float32 and reproduce to float32 rounding


@pytest.fixture(scope="module")
def fx(fixtures_dir):
  return np.load(fixtures_dir / "laga_heads_losses.npz")


def test_label_smoothing_ce_matches_author_fixture(fx):
  loss = losses.label_smoothing_cross_entropy(fx["lsce.logits"], fx["lsce.labels"], 0.1)
  np.testing.assert_allclose(loss, fx["lsce.loss"], rtol=RTOL)


def test_label_smoothing_ce_is_paper_eq_10():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 7)) * 3
  labels = rng.integers(0, 7, 6)
  eps, classes = 0.2, 7
  q = np.full((6, 7), eps / classes)
  q[np.arange(6), labels] = 1 - (classes - 1) / classes * eps
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(q * log_p).sum(-1).mean()  # eq. (9) with the author's batch mean
  np.testing.assert_allclose(losses.label_smoothing_cross_entropy(logits, labels, eps), expected, rtol=1e-6)
  plain = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), labels).mean()
  np.testing.assert_allclose(losses.label_smoothing_cross_entropy(logits, labels, 0.0), plain, rtol=1e-6)


@pytest.mark.parametrize("normalize, key", [(False, "raw"), (True, "normalised")])
def test_batch_hard_triplet_matches_author_fixture(fx, normalize, key):
  loss, dist_ap, dist_an = losses.batch_hard_triplet(
      fx["triplet.features"], fx["triplet.labels"], float(fx["triplet.margin"]), normalize)
  np.testing.assert_allclose(loss, fx[f"triplet.{key}.loss"], rtol=RTOL)
  np.testing.assert_allclose(dist_ap, fx[f"triplet.{key}.dist_ap"], rtol=RTOL)
  np.testing.assert_allclose(dist_an, fx[f"triplet.{key}.dist_an"], rtol=RTOL)


def test_batch_hard_triplet_hand_worked():
  # 1-D points 0, 1 (id 0) and 3, 5 (id 1): hardest positive / negative distances by hand.
  features = np.array([[0.0], [1.0], [3.0], [5.0]], np.float32)
  loss, dist_ap, dist_an = losses.batch_hard_triplet(features, np.array([0, 0, 1, 1]), margin=1.2)
  np.testing.assert_allclose(dist_ap, [1, 1, 2, 2], rtol=1e-5)
  np.testing.assert_allclose(dist_an, [3, 2, 2, 4], rtol=1e-5)
  # hinges: max(0, 1-3+1.2)=0, 1-2+1.2=0.2, 2-2+1.2=1.2, max(0, 2-4+1.2)=0
  np.testing.assert_allclose(loss, (0.2 + 1.2) / 4, rtol=1e-5)


def test_batch_hard_triplet_single_identity_batch_is_zero_with_finite_gradient():
  features = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  labels = jnp.zeros(4, jnp.int32)
  loss, dist_ap, dist_an = losses.batch_hard_triplet(features, labels)
  assert float(loss) == 0.0 and np.all(np.isinf(dist_an)) and np.all(dist_ap > 0)
  grad = jax.jit(jax.grad(lambda f: losses.batch_hard_triplet(f, labels)[0]))(features)
  np.testing.assert_array_equal(grad, np.zeros((4, 3)))


def test_batch_hard_triplet_gradient_finite_for_coinciding_embeddings():
  # Rows 0 and 1 (same id) coincide, and so do rows 2 (id 1) and 3 (id 2): a zero positive and a zero
  # negative distance, both at the sqrt's clamp.
  base = np.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.3, -1.0, 2.0], [-2.0, 0.0, 1.0]],
                  np.float32)
  labels = np.array([0, 0, 1, 2, 2])
  loss, grad = jax.jit(jax.value_and_grad(lambda f: losses.batch_hard_triplet(f, labels, margin=1.2)[0]))(base)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Anchors 2 and 3 have their hardest negative at distance ~0: each hinge is about d_ap + 1.2.
  d = np.linalg.norm(base[:, None] - base[None], axis=-1)
  dist_ap = np.array([d[0, 1], d[0, 1], 0.0, d[3, 4], d[3, 4]])
  dist_an = np.array([d[0, 2:].min(), d[1, 2:].min(), 0.0, 0.0, min(d[4, :2].min(), d[4, 2])])
  np.testing.assert_allclose(loss, np.maximum(dist_ap - dist_an + 1.2, 0).mean(), atol=1e-5)


# --- eq. (8) over the six heads -------------------------------------------------------------------------------

def _outputs(seed, heads=6, batch=8, classes=5, dim=12):
  rng = np.random.default_rng(seed)
  return {"logits": rng.standard_normal((heads, batch, classes)).astype(np.float32) * 2,
          "embeddings": rng.standard_normal((heads, batch, dim)).astype(np.float32),
          "pooled": rng.standard_normal((heads, batch, 2 * dim)).astype(np.float32)}


@pytest.mark.parametrize("feature, key", [("embedding", "embeddings"), ("pooled", "pooled")])
def test_laga_loss_sums_heads(feature, key):
  outputs = _outputs(1)
  labels = np.repeat(np.arange(4), 2)
  loss_fn = jax.jit(functools.partial(losses.laga_loss, label_smoothing=0.1, beta=0.3, margin=1.2,
                                      normalize=False, triplet_feature=feature))
  loss, metrics = loss_fn(outputs, labels)
  ce = sum(losses.label_smoothing_cross_entropy(l, labels, 0.1) for l in outputs["logits"])
  triplet = sum(losses.batch_hard_triplet(f, labels, 1.2)[0] for f in outputs[key])
  np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["triplet"], triplet, rtol=1e-6)
  np.testing.assert_allclose(loss, ce + 0.3 * triplet, rtol=1e-6)
  assert float(metrics["loss"]) == float(loss)
  assert float(metrics["triplet"]) > 0


def test_laga_loss_accuracy_uses_summed_softmax():
  # Two heads lean weakly to class 0, one head strongly to class 1: a majority vote says 0, the summed
  # softmax (the author's prediction) says 1.
  weak, strong = np.log([0.4, 0.35, 0.25]), np.log([0.005, 0.99, 0.005])
  logits = np.stack([weak, weak, strong])[:, None, :].astype(np.float32)  # (3 heads, 1 image, 3 classes)
  _, metrics = losses.laga_loss({"logits": logits}, np.array([1]), beta=0.0)
  assert float(metrics["accuracy"]) == 1.0
  _, metrics = losses.laga_loss({"logits": logits}, np.array([0]), beta=0.0)
  assert float(metrics["accuracy"]) == 0.0


def test_laga_loss_beta_zero_is_cross_entropy_only():
  outputs = _outputs(2)
  labels = np.repeat(np.arange(4), 2)
  loss, metrics = jax.jit(functools.partial(losses.laga_loss, beta=0.0))(
      {"logits": outputs["logits"]}, labels)  # no embeddings needed
  full, _ = jax.jit(functools.partial(losses.laga_loss, beta=0.1))(outputs, labels)
  np.testing.assert_allclose(loss, metrics["ce"], rtol=1e-7)
  assert float(metrics["triplet"]) == 0.0 and float(full) > float(loss)


def test_laga_loss_gradient_reaches_logits_and_embeddings():
  outputs = {k: jnp.asarray(v) for k, v in _outputs(3).items()}
  labels = np.repeat(np.arange(4), 2)
  grads = jax.jit(jax.grad(lambda o: losses.laga_loss(o, labels)[0]))(outputs)
  for key in ("logits", "embeddings"):
    assert np.all(np.isfinite(grads[key])) and np.abs(grads[key]).sum(axis=(1, 2)).min() > 0
  np.testing.assert_array_equal(grads["pooled"], 0)


def test_laga_loss_errors_name_the_option():
  outputs = _outputs(4)
  labels = np.zeros(8, np.int32)
  with pytest.raises(ValueError, match=r"triplet_feature='bnneck' \(config.loss.triplet_feature\)"):
    losses.laga_loss(outputs, labels, triplet_feature="bnneck")
  with pytest.raises(KeyError, match=r"needs outputs\['embeddings'\]"):
    losses.laga_loss({"logits": outputs["logits"]}, labels)
  with pytest.raises(ValueError, match=r"config.loss.label_smoothing"):
    losses.label_smoothing_cross_entropy(outputs["logits"][0], labels, 1.5)
