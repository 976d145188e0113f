"""LAGA-Net's optimiser: Adam with coupled L2 on every parameter, the backbone at 0.1x the learning rate of
the new layers, and a per-epoch learning rate (linear warm-up, then step decay; paper §IV, SPEC "Training").
"""

from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

GROUPS = ("backbone", "new")


def _check_schedule(optim_cfg: ml_collections.ConfigDict) -> None:
  if optim_cfg.warmup_epochs < 0:
    raise ValueError(f"config.optim.warmup_epochs={optim_cfg.warmup_epochs}: expected >= 0")
  decay = tuple(optim_cfg.decay_epochs)
  if list(decay) != sorted(decay) or any(e < optim_cfg.warmup_epochs for e in decay):
    raise ValueError(f"config.optim.decay_epochs={decay}: expected ascending epochs, none before the end of "
                     f"the warm-up (config.optim.warmup_epochs={optim_cfg.warmup_epochs})")


def learning_rate(epoch: int, optim_cfg: ml_collections.ConfigDict) -> float:
  """LR of the new layers for 0-based `epoch`, set once at the epoch's start.

  e < warmup: warmup_start_lr + (lr - warmup_start_lr) e / warmup (8e-6 -> 8e-4 over 10 epochs);
  then lr * decay_factor^(number of decay epochs <= e) (halved at 40 and at 60).
  """
  _check_schedule(optim_cfg)
  if epoch < 0:
    raise ValueError(f"epoch={epoch}: expected a 0-based epoch index >= 0")
  if epoch < optim_cfg.warmup_epochs:
    start = optim_cfg.warmup_start_lr
    return start + (optim_cfg.lr - start) * epoch / optim_cfg.warmup_epochs
  return optim_cfg.lr * optim_cfg.decay_factor ** sum(epoch >= e for e in optim_cfg.decay_epochs)


def make_schedule(optim_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """step -> `learning_rate(step // steps_per_epoch)`, one jit-safe table lookup.

  Not `optax.join_schedules`: it restarts the step count at each boundary, which would shift the decay
  epochs by the warm-up length.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} (config.train.steps_per_epoch): expected >= 1")
  _check_schedule(optim_cfg)
  # The LR is constant from the last warm-up/decay boundary on, so a table up to it covers every epoch.
  last = max([optim_cfg.warmup_epochs, *optim_cfg.decay_epochs])
  table = np.array([learning_rate(e, optim_cfg) for e in range(last + 1)], np.float32)

  def schedule(step):
    return jnp.asarray(table)[jnp.minimum(step // steps_per_epoch, last)]

  return schedule


def _group_of(top_level_key: str) -> str:
  return "backbone" if top_level_key == "backbone" or top_level_key.startswith("layer4") else "new"


def _fill(tree: Any, label: str) -> Any:
  return jax.tree_util.tree_map(lambda _: label, tree)


def param_labels(params: Mapping[str, Any]) -> Dict[str, Any]:
  """The optimiser group of every parameter: "backbone" (top-level `backbone`, `layer4*`) or "new".

  The pretrained ResNet50 (stem..layer3 under `backbone`, the branches' layer4 copies) is the backbone;
  attention modules and heads are new layers.
  """
  labels = {key: _fill(sub, _group_of(key)) for key, sub in params.items()}
  if "backbone" not in jax.tree_util.tree_leaves(labels):
    raise ValueError(f"param_labels: no backbone parameters among the top-level keys {sorted(params)}; "
                     "expected 'backbone' and/or keys starting with 'layer4'")
  return labels


def _group_transform(optim_cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
                     multiplier: float) -> optax.GradientTransformation:
  return optax.chain(
      # Coupled L2 as torch.optim.Adam(weight_decay=...): added to the gradient *before* the moments
      # (not AdamW), on every parameter including BN scales/biases, gamma and R_H/R_W.
      optax.add_decayed_weights(optim_cfg.weight_decay),
      optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
      # The multiplier must come after Adam, which is invariant to gradient scale.
      optax.scale_by_learning_rate(lambda step: multiplier * schedule(step)),
  )


def make_optimizer(optim_cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam + coupled L2 per group (`param_labels`), backbone at `backbone_lr_mult` x the schedule."""
  schedule = make_schedule(optim_cfg, steps_per_epoch)
  return optax.partition(
      {"backbone": _group_transform(optim_cfg, schedule, optim_cfg.backbone_lr_mult),
       "new": _group_transform(optim_cfg, schedule, 1.0)},
      param_labels)


def current_learning_rates(optim_cfg: ml_collections.ConfigDict, step: int,
                           steps_per_epoch: int) -> Dict[str, float]:
  """The learning rate each group uses at optimiser step `step` (0-based), for logging."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} (config.train.steps_per_epoch): expected >= 1")
  lr = learning_rate(int(step) // steps_per_epoch, optim_cfg)
  return {"backbone": optim_cfg.backbone_lr_mult * lr, "new": lr}
