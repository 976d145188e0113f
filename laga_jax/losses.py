"""LAGA-Net training losses: label-smoothed cross-entropy (eq. 9-10) and batch-hard triplet (eq. 11), summed
over the six heads (eq. 8).

Reductions follow the author's code rather than the paper's sums: both losses are averaged over the batch
(anchors), then summed over heads. Every loss is computed in float32 whatever the model's compute dtype.
"""

from typing import Mapping, Tuple

import jax
import jax.numpy as jnp
import optax

TRIPLET_FEATURES = {"embedding": "embeddings", "pooled": "pooled"}


def label_smoothing_cross_entropy(logits: jax.Array, labels: jax.Array, epsilon: float = 0.1) -> jax.Array:
  """Eq. (9)-(10) averaged over the batch: CE against targets (1 - eps) onehot + eps / C.

  logits (B, C), integer labels (B,) -> scalar.
  """
  if not 0.0 <= epsilon < 1.0:
    raise ValueError(f"label smoothing epsilon={epsilon} (config.loss.label_smoothing): expected 0 <= eps < 1")
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), epsilon)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def pairwise_distances(features: jax.Array) -> jax.Array:
  """Euclidean distances sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12)), as the author's triplet code computes them.

  The clamp keeps the gradient finite for coinciding features (the diagonal included).
  """
  sq_norms = jnp.sum(jnp.square(features), axis=-1)
  sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * features @ features.T
  return jnp.sqrt(jnp.maximum(sq_dist, 1e-12))


def batch_hard_triplet(features: jax.Array, labels: jax.Array, margin: float = 1.2,
                       normalize: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. (11), mean over anchors: max(0, d(a, hardest positive) - d(a, hardest negative) + margin).

  features (B, D), labels (B,) -> (loss, dist_ap (B,), dist_an (B,)). The anchor is its own positive
  (distance ~1e-6), as in the author's mining. An anchor without negatives (a one-identity batch) has
  dist_an = +inf and contributes zero loss.
  """
  features = features.astype(jnp.float32)
  if normalize:
    # The author's normalize(): x / (|x| + 1e-12).
    features = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-12)
  dist = pairwise_distances(features)
  same = labels[:, None] == labels[None, :]
  dist_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  dist_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  loss = jnp.mean(jax.nn.relu(dist_ap - dist_an + margin))
  return loss, dist_ap, dist_an


def laga_loss(outputs: Mapping[str, jax.Array], labels: jax.Array, *, label_smoothing: float = 0.1,
              beta: float = 0.1, margin: float = 1.2, normalize: bool = False,
              triplet_feature: str = "embedding") -> Tuple[jax.Array, dict]:
  """Eq. (8): sum over heads of LS-CE + beta * sum over heads of batch-hard triplet.

  `outputs` holds stacked per-head arrays: "logits" (heads, B, classes) and, for the triplet,
  "embeddings" (heads, B, R) or "pooled" (heads, B, 2048) per `triplet_feature`. beta = 0 skips the
  triplet (the author's CE-only training). Metrics: ce, triplet (both summed over heads, unweighted),
  loss, and accuracy of the argmax of the heads' summed softmaxes (as the author's code scores).
  """
  if triplet_feature not in TRIPLET_FEATURES:
    raise ValueError(f"triplet_feature={triplet_feature!r} (config.loss.triplet_feature): expected one of "
                     f"{tuple(TRIPLET_FEATURES)}")
  if beta < 0:
    raise ValueError(f"beta={beta} (config.loss.triplet_beta): expected >= 0")
  logits = outputs["logits"]
  if logits.ndim != 3:
    raise ValueError(f"outputs['logits'] must be stacked per head (heads, B, classes); got {logits.shape}")
  ce = jnp.sum(jax.vmap(label_smoothing_cross_entropy, in_axes=(0, None, None))(logits, labels, label_smoothing))
  if beta > 0:
    key = TRIPLET_FEATURES[triplet_feature]
    if key not in outputs:
      raise KeyError(f"triplet_feature={triplet_feature!r} needs outputs[{key!r}]; got keys {sorted(outputs)}")
    per_head = jax.vmap(lambda f: batch_hard_triplet(f, labels, margin, normalize)[0])(outputs[key])
    triplet = jnp.sum(per_head)
  else:
    triplet = jnp.zeros((), jnp.float32)
  loss = ce + beta * triplet
  probs = jnp.sum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
  accuracy = jnp.mean((jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32))
  return loss, {"loss": loss, "ce": ce, "triplet": triplet, "accuracy": accuracy}
