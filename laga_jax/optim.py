"""Optimisers by name, per-epoch learning-rate schedules, and parameter groups by regular expression.

* `config.optim.name`: "adam" (torch.optim.Adam: L2 coupled into the gradient, LAGA-Net paper §IV-B),
  "adamw" (decoupled decay, torch.optim.AdamW) or "sgd" (torch.optim.SGD: coupled L2, momentum, Nesterov).
* `config.optim.schedule`: "warmup_multistep" (linear warm-up, then x`decay_factor` at each of
  `decay_epochs`; LAGA-Net, BoT, MGN) or "warmup_cosine" (linear warm-up, then cosine to `min_lr`). The rate
  is set once per epoch, as the reference PyTorch schedulers step per epoch.
* `config.optim.param_groups`: ordered (regex, multiplier) rules over "/"-joined parameter paths, first match
  wins, multiplier a float or "frozen" (no update, no decay); the word "backbone" stands for the model's
  `BACKBONE_PATTERN`. Every parameter must match a rule and every rule a parameter (big_vision's
  `schedule`/`lr_mults` idea, with the completeness check made strict).
* A loss's own parameters (BoT's center loss: plain SGD at `config.loss.center.lr`, gradient scaled by
  1 / weight as in its reference code) form one more group, outside the rules.
"""

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("warmup_multistep", "warmup_cosine")
FROZEN = "frozen"
BACKBONE = "backbone"
# Top-level parameter collections owned by losses, not by the model (see `laga_jax.losses`).
LOSS_PARAMS = "center_loss"


def _check_schedule(optim_cfg: ml_collections.ConfigDict) -> None:
  if optim_cfg.warmup_epochs < 0:
    raise ValueError(f"config.optim.warmup_epochs={optim_cfg.warmup_epochs}: expected >= 0")
  schedule = optim_cfg.get("schedule", "warmup_multistep")
  if schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={schedule!r}: expected one of {SCHEDULES}")
  decay = tuple(optim_cfg.decay_epochs)
  if schedule == "warmup_multistep" and (
      list(decay) != sorted(decay) or any(e < optim_cfg.warmup_epochs for e in decay)):
    raise ValueError(f"config.optim.decay_epochs={decay}: expected ascending epochs, none before the end of "
                     f"the warm-up (config.optim.warmup_epochs={optim_cfg.warmup_epochs})")


def learning_rate(epoch: int, optim_cfg: ml_collections.ConfigDict, num_epochs: Optional[int] = None) -> float:
  """LR (multiplier 1) for 0-based `epoch`, set once at the epoch's start.

  e < warmup: warmup_start_lr + (lr - warmup_start_lr) e / warmup (LAGA-Net: 8e-6 -> 8e-4 over 10 epochs);
  then "warmup_multistep": lr * decay_factor^(number of decay epochs <= e) (halved at 40 and at 60);
  or "warmup_cosine": min_lr + (lr - min_lr) (1 + cos(pi (e - warmup) / (num_epochs - warmup))) / 2.
  """
  _check_schedule(optim_cfg)
  if epoch < 0:
    raise ValueError(f"epoch={epoch}: expected a 0-based epoch index >= 0")
  if epoch < optim_cfg.warmup_epochs:
    start = optim_cfg.warmup_start_lr
    return start + (optim_cfg.lr - start) * epoch / optim_cfg.warmup_epochs
  if optim_cfg.get("schedule", "warmup_multistep") == "warmup_cosine":
    if num_epochs is None:
      raise ValueError("the warmup_cosine schedule needs the number of epochs (config.train.num_epochs)")
    span = max(num_epochs - optim_cfg.warmup_epochs, 1)
    progress = min((epoch - optim_cfg.warmup_epochs) / span, 1.0)
    min_lr = optim_cfg.get("min_lr", 0.0)
    return min_lr + (optim_cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
  return optim_cfg.lr * optim_cfg.decay_factor ** sum(epoch >= e for e in optim_cfg.decay_epochs)


def make_schedule(optim_cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                  num_epochs: Optional[int] = None) -> optax.Schedule:
  """step -> `learning_rate(step // steps_per_epoch)`, one jit-safe table lookup.

  Not `optax.join_schedules`: it restarts the step count at each boundary, which would shift the decay
  epochs by the warm-up length.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} (config.train.steps_per_epoch): expected >= 1")
  _check_schedule(optim_cfg)
  if optim_cfg.get("schedule", "warmup_multistep") == "warmup_cosine":
    last = max(num_epochs or 0, optim_cfg.warmup_epochs)
  else:
    # Constant from the last warm-up/decay boundary on, so a table up to it covers every epoch.
    last = max([optim_cfg.warmup_epochs, *optim_cfg.decay_epochs])
  table = np.array([learning_rate(e, optim_cfg, num_epochs) for e in range(last + 1)], np.float32)

  def schedule(step):
    return jnp.asarray(table)[jnp.minimum(step // steps_per_epoch, last)]

  return schedule


# --- parameter groups --------------------------------------------------------------------------------------

def path_string(path: Sequence[Any]) -> str:
  """"/"-joined names of a pytree path, e.g. "backbone/layer3_0/conv1/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _rules(optim_cfg: ml_collections.ConfigDict, backbone_pattern: Optional[str]) -> List[Tuple[str, Any]]:
  rules = []
  for i, rule in enumerate(optim_cfg.param_groups):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"config.optim.param_groups[{i}]={rule!r}: expected (regex, lr multiplier or 'frozen')")
    pattern, mult = rule
    if pattern == BACKBONE:
      if backbone_pattern is None:
        raise ValueError(f"config.optim.param_groups[{i}] uses 'backbone' but the model defines no "
                         "BACKBONE_PATTERN")
      pattern = backbone_pattern
    try:
      re.compile(pattern)
    except re.error as error:
      raise ValueError(f"config.optim.param_groups[{i}]: {pattern!r} is not a regular expression ({error})")
    if mult != FROZEN and (isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0):
      raise ValueError(f"config.optim.param_groups[{i}]: multiplier {mult!r}: expected a number >= 0 or "
                       f"{FROZEN!r}")
    rules.append((pattern, mult))
  if not rules:
    raise ValueError("config.optim.param_groups is empty: expected at least one (regex, multiplier) rule")
  return rules


def group_names(optim_cfg: ml_collections.ConfigDict) -> List[str]:
  """Display name of every rule (logged as lr_<name>): "backbone" for the keyword, "new" for the catch-all
  ".*" (the layers the model adds to the backbone), else "group<i>"."""
  special = {BACKBONE: BACKBONE, ".*": "new"}
  return [special.get(rule[0], f"group{i}") for i, rule in enumerate(optim_cfg.param_groups)]


def param_labels(params: Mapping[str, Any], optim_cfg: ml_collections.ConfigDict,
                 backbone_pattern: Optional[str] = None) -> Any:
  """The group label ("rule<i>", or the loss group) of every parameter, checked for completeness.

  Raises naming every parameter no rule matches, and every rule that matches no parameter.
  """
  rules = _rules(optim_cfg, backbone_pattern)
  used = [False] * len(rules)
  unmatched = []

  def label(path, _):
    name = path_string(path)
    if name.split("/", 1)[0] == LOSS_PARAMS:
      return LOSS_PARAMS
    for i, (pattern, _mult) in enumerate(rules):
      if re.search(pattern, name):
        used[i] = True
        return f"rule{i}"
    unmatched.append(name)
    return None

  labels = jax.tree_util.tree_map_with_path(label, params)
  if unmatched:
    shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
    raise ValueError(f"config.optim.param_groups={tuple(tuple(r) for r in optim_cfg.param_groups)} leaves "
                     f"{len(unmatched)} parameter(s) unmatched: {shown}; add a rule (e.g. ('.*', 1.0)) last")
  unused = [optim_cfg.param_groups[i] for i, u in enumerate(used) if not u]
  if unused:
    raise ValueError(f"config.optim.param_groups: rule(s) {unused} match no parameter of the model")
  return labels


def _base_transform(optim_cfg: ml_collections.ConfigDict, lr_fn) -> optax.GradientTransformation:
  name = optim_cfg.get("name", "adam")
  wd = optim_cfg.weight_decay
  if name == "adam":
    return optax.chain(
        # Coupled L2 as torch.optim.Adam(weight_decay=...): added to the gradient *before* the moments,
        # on every parameter including BN scales/biases.
        optax.add_decayed_weights(wd),
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        # The multiplier must come after Adam, which is invariant to gradient scale.
        optax.scale_by_learning_rate(lr_fn))
  if name == "adamw":
    # torch.optim.AdamW: p -= lr * (adam_update + wd * p).
    return optax.chain(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
                       optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr_fn))
  if name == "sgd":
    # torch.optim.SGD: g += wd p; buf = momentum buf + g; nesterov uses g + momentum buf.
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.trace(decay=optim_cfg.momentum, nesterov=bool(optim_cfg.nesterov)),
                       optax.scale_by_learning_rate(lr_fn))
  raise ValueError(f"config.optim.name={name!r}: expected one of {OPTIMIZERS}")


def make_optimizer(optim_cfg: ml_collections.ConfigDict, steps_per_epoch: int, *,
                   backbone_pattern: Optional[str] = None, num_epochs: Optional[int] = None,
                   loss_cfg: Optional[ml_collections.ConfigDict] = None) -> optax.GradientTransformation:
  """The optimiser of `optim_cfg` per parameter group (`param_labels`), each rule at multiplier x schedule.

  With `loss_cfg` and a center loss, the `center_loss` parameters get plain SGD at `loss_cfg.center.lr` on
  the gradient divided by the loss weight (BoT's reference: the centers learn from the unweighted loss).
  """
  schedule = make_schedule(optim_cfg, steps_per_epoch, num_epochs)
  rules = _rules(optim_cfg, backbone_pattern)
  transforms = {}
  for i, (_pattern, mult) in enumerate(rules):
    if mult == FROZEN:
      transforms[f"rule{i}"] = optax.set_to_zero()
    else:
      transforms[f"rule{i}"] = _base_transform(optim_cfg, lambda step, m=float(mult): m * schedule(step))
  center_weight = float(loss_cfg.center.weight) if loss_cfg is not None and "center" in loss_cfg else 0.0
  transforms[LOSS_PARAMS] = (optax.chain(optax.scale(1.0 / center_weight), optax.sgd(loss_cfg.center.lr))
                             if center_weight > 0 else optax.set_to_zero())
  return optax.multi_transform(transforms,
                               lambda params: param_labels(params, optim_cfg, backbone_pattern))


def current_learning_rates(optim_cfg: ml_collections.ConfigDict, step: int, steps_per_epoch: int,
                           num_epochs: Optional[int] = None) -> Dict[str, float]:
  """The learning rate of every non-frozen group at optimiser step `step` (0-based), for logging."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} (config.train.steps_per_epoch): expected >= 1")
  lr = learning_rate(int(step) // steps_per_epoch, optim_cfg, num_epochs)
  out = {}
  for name, (_pattern, mult) in zip(group_names(optim_cfg), optim_cfg.param_groups):
    if mult != FROZEN:
      out[name] = float(mult) * lr
  return out
