"""The train state and the per-device train / validation steps (pure functions).

The loop that drives them lives in `laga_jax.trainer`; the device mapping in `laga_jax.parallel`.
"""

import functools
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax import lax

from laga_jax import losses
from laga_jax.optim import LOSS_PARAMS
from laga_jax.parallel import DATA_AXIS

Metrics = dict


class TrainState(train_state.TrainState):
  """params, BatchNorm statistics, optimiser state, step and the dropout key, in one pytree."""
  batch_stats: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The model's variables (without the losses' own parameters, e.g. BoT's centers)."""
    return {"params": split_params(self.params)[0], "batch_stats": self.batch_stats}

  def checkpoint_tree(self) -> dict:
    """What a checkpoint stores: every array of the state (the functions are rebuilt from the config)."""
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state, "rng": self.rng}

  def replace_from_checkpoint(self, tree: dict) -> "TrainState":
    return self.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                        opt_state=tree["opt_state"], rng=tree["rng"])


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation,
                       variables: dict, rng: jax.Array) -> TrainState:
  """Wrap initialised (and possibly pretrained) `variables` into a `TrainState` at step 0."""
  return _state_creator(model, tx)(variables["params"], variables["batch_stats"], rng)


@functools.lru_cache(maxsize=8)
def _state_creator(model: flax.linen.Module, tx: optax.GradientTransformation):
  """`create_train_state` as one jitted program per (model, optimiser): eagerly, the optimiser's initial state
  would compile a zeros op per distinct parameter shape."""
  # The step as a (strong) int32, the type a restored checkpoint's step has, so that a fresh and a resumed
  # state in one process take the same compiled train step (a weak-typed 0 would be traced again).
  return jax.jit(lambda params, batch_stats, rng: TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats, rng=rng).replace(
          step=jnp.zeros((), jnp.int32)))


def _gather_batch(x: jax.Array, axis: int, axis_name: Optional[str]) -> jax.Array:
  """The global batch on every device, differentiable only through this device's own rows.

  Batch-hard mining needs the whole P×K batch. The other devices' rows enter as constants, and the local
  rows are written back live: the gradient of the *full* loss w.r.t. this device's rows is then exact,
  and summing (psum) the per-device parameter gradients gives the single-device gradient.
  """
  if axis_name is None:
    return x
  everyone = lax.all_gather(lax.stop_gradient(x), axis_name, axis=axis, tiled=True)
  start = lax.axis_index(axis_name) * x.shape[axis]
  return lax.dynamic_update_slice_in_dim(everyone, x, start, axis=axis)


def _as_per_device(tree: Any, axis_name: str) -> Any:
  """Mark replicated values as per-device, so that `jax.grad` returns this device's own gradient.

  Under `shard_map` (and `pmap`, built on it since JAX 0.8) the gradient of a replicated input is
  otherwise summed over devices implicitly; marking it varying keeps the sum explicit (`lax.psum` below)
  and the step the same on every JAX version.
  """
  if hasattr(lax, "pcast"):
    return lax.pcast(tree, axis_name, to="varying")
  if hasattr(lax, "pvary"):
    return lax.pvary(tree, axis_name)
  return tree


def split_params(params: dict) -> Tuple[dict, Optional[dict]]:
  """(model parameters, the losses' own parameters or None): losses keep theirs under `LOSS_PARAMS`."""
  if LOSS_PARAMS not in params:
    return params, None
  return {k: v for k, v in params.items() if k != LOSS_PARAMS}, params[LOSS_PARAMS]


def train_step(state: TrainState, batch: dict, *, loss_cfg: ml_collections.ConfigDict,
               axis_name: Optional[str] = DATA_AXIS) -> Tuple[TrainState, Metrics]:
  """One optimiser step on this device's share of the batch (the configured loss over the global batch).

  Collectives over `axis_name`: BatchNorm statistics (inside the model), the gathered batch for the loss,
  and the summed gradients. With `axis_name=None` it is a plain single-device step.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, lax.axis_index(axis_name))
  labels = batch["label"]
  all_labels = labels if axis_name is None else lax.all_gather(labels, axis_name, tiled=True)
  needed = losses.feature_keys(loss_cfg)

  def loss_fn(params):
    model_params, loss_params = split_params(params)
    outputs, mutated = state.apply_fn(
        {"params": model_params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"], rngs={"dropout": step_rng})
    outputs = {k: _gather_batch(outputs[k], 1, axis_name) for k in needed}
    loss, metrics = losses.reid_loss(outputs, all_labels, loss_cfg, loss_params)
    return loss, (metrics, mutated["batch_stats"])

  params = state.params if axis_name is None else _as_per_device(state.params, axis_name)
  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
  if axis_name is not None:
    grads = lax.psum(grads, axis_name)
    # Identical on every device already; the mean marks them replicated for shard_map's checker.
    metrics = lax.pmean(metrics, axis_name)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grads)))
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics["finite"] = jnp.isfinite(metrics["loss"]).astype(jnp.float32)
  return new_state, metrics


def val_step(state: TrainState, batch: dict, *, axis_name: Optional[str] = DATA_AXIS) -> Metrics:
  """Correct / counted validation images (hands): argmax of the heads' summed softmaxes vs the label."""
  outputs = state.apply_fn(state.variables(), batch["image"], train=False)
  probs = jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1).sum(axis=0)
  mask = batch["mask"].astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(probs, axis=-1) == batch["label"]) * mask)
  counted = jnp.sum(mask)
  if axis_name is not None:
    correct, counted = lax.psum((correct, counted), axis_name)
  return {"correct": correct, "count": counted}


def make_train_step(loss_cfg: ml_collections.ConfigDict, axis_name: Optional[str] = DATA_AXIS):
  return functools.partial(train_step, loss_cfg=loss_cfg, axis_name=axis_name)


def make_val_step(axis_name: Optional[str] = DATA_AXIS):
  return functools.partial(val_step, axis_name=axis_name)
