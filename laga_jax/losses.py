"""Re-id training losses by name: label-smoothed cross-entropy (LAGA-Net eq. 9-10), batch-hard triplet with a
hard or soft margin (eq. 11; Hermans et al. 2017), and the center loss (Wen et al. 2016, as BoT uses it).

`reid_loss` sums the configured terms, each over the heads (or feature taps) the model returns: LAGA-Net's
eq. (8) is CE + 0.1 x triplet summed over its six heads. Reductions follow the reference code rather than
the papers' sums: every loss is averaged over the batch (anchors), then summed (or averaged) over heads.
Every loss is computed in float32 whatever the model's compute dtype.
"""

from typing import Any, Mapping, Optional, Tuple

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
                       normalize: bool = False, soft: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. (11), mean over anchors: max(0, d(a, hardest positive) - d(a, hardest negative) + margin).

  `soft=True` is the soft margin of Hermans et al.: log(1 + exp(d_ap - d_an)) (torch's SoftMarginLoss with
  target 1, as BoT's reference uses it when no margin is set); `margin` is then unused.

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
  if soft:
    loss = jnp.mean(jax.nn.softplus(dist_ap - dist_an))
  else:
    loss = jnp.mean(jax.nn.relu(dist_ap - dist_an + margin))
  return loss, dist_ap, dist_an


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
  """Wen et al. (2016) as BoT's reference computes it: mean over the batch of |f_i - c_{y_i}|^2.

  features (B, D), labels (B,), centers (C, D) -> scalar (no 1/2 factor, as in the reference).
  """
  features = features.astype(jnp.float32)
  diff = features - centers[labels].astype(jnp.float32)
  return jnp.mean(jnp.clip(jnp.sum(jnp.square(diff), axis=-1), 1e-12, 1e12))


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


LOSS_NAMES = ("ce", "triplet", "center")
HEAD_REDUCTIONS = ("sum", "mean")


def _stacked(outputs: Mapping[str, jax.Array], key: str, option: str) -> jax.Array:
  if key not in outputs:
    raise KeyError(f"--config.{option}={key!r}: the model returns no such output; it has {sorted(outputs)}")
  value = outputs[key]
  if value.ndim != 3:
    raise ValueError(f"outputs[{key!r}] must be stacked per head (heads, B, D); got shape {value.shape}")
  return value


def reid_loss(outputs: Mapping[str, jax.Array], labels: jax.Array, loss_cfg: Any,
              loss_params: Optional[Mapping[str, Any]] = None) -> Tuple[jax.Array, dict]:
  """The weighted sum of the configured losses (`config.loss`), each reduced over its heads.

  outputs: "logits" (heads, B, classes) and the feature taps named by `loss_cfg.triplet.feature` /
  `loss_cfg.center.feature`, each (taps, B, D). A weight of 0 leaves a term out. `loss_params["centers"]`
  (taps, classes, D) holds the center loss's centers. Metrics: loss, each term (unweighted, reduced over
  heads), and the accuracy of the argmax of the heads' summed softmaxes (as the author's code scores).
  """
  reduction = loss_cfg.get("head_reduction", "sum")
  if reduction not in HEAD_REDUCTIONS:
    raise ValueError(f"--config.loss.head_reduction={reduction!r}: expected one of {HEAD_REDUCTIONS}")
  reduce = jnp.sum if reduction == "sum" else jnp.mean
  logits = _stacked(outputs, "logits", "loss.ce")
  metrics = {}
  loss = jnp.zeros((), jnp.float32)
  if loss_cfg.ce.weight > 0:
    ce = reduce(jax.vmap(label_smoothing_cross_entropy, in_axes=(0, None, None))(
        logits, labels, loss_cfg.ce.label_smoothing))
    metrics["ce"] = ce
    loss = loss + loss_cfg.ce.weight * ce
  if loss_cfg.triplet.weight > 0:
    t = loss_cfg.triplet
    features = _stacked(outputs, t.feature, "loss.triplet.feature")
    triplet = reduce(jax.vmap(lambda f: batch_hard_triplet(f, labels, t.margin, t.normalize, t.soft)[0])(
        features))
    metrics["triplet"] = triplet
    loss = loss + t.weight * triplet
  if "center" in loss_cfg and loss_cfg.center.weight > 0:
    features = _stacked(outputs, loss_cfg.center.feature, "loss.center.feature")
    if loss_params is None or "centers" not in loss_params:
      raise ValueError("--config.loss.center.weight > 0 needs the center loss's parameters (loss_params)")
    center = reduce(jax.vmap(center_loss, in_axes=(0, None, 0))(features, labels, loss_params["centers"]))
    metrics["center"] = center
    loss = loss + loss_cfg.center.weight * center
  probs = jnp.sum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=0)
  metrics["accuracy"] = jnp.mean((jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32))
  metrics["loss"] = loss
  return loss, metrics


def feature_keys(loss_cfg: Any) -> Tuple[str, ...]:
  """The model outputs `reid_loss` reads under `loss_cfg` ("logits" first)."""
  keys = ["logits"]
  if loss_cfg.triplet.weight > 0:
    keys.append(loss_cfg.triplet.feature)
  if "center" in loss_cfg and loss_cfg.center.weight > 0:
    keys.append(loss_cfg.center.feature)
  return tuple(dict.fromkeys(keys))
