"""The JAX half of the trajectory parity: the project's own model, loss, optimiser and train step.

Everything taken from the project's training API sits in `project_training` (LAGA-Net from the base config,
BoT from configs/bot.py); the rest maps the reference's PyTorch state dict onto the model's variables through
the model's own ports (LAGA-Net: its torchvision port for the backbone and `laga_jax.models.attention`'s
converters for CAM / SAM-RPE; BoT: `laga_jax.models.bot.reference_variables`) and runs the steps. No torch
import.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.torch_reference import spec as spec_lib

BRANCHES = ("global", "local", "spatial", "channel")


@dataclasses.dataclass
class ProjectTraining:
  model: Any                                        # the Flax model (`config.model.name`: "laga" or "bot")
  to_variables: Callable[[Mapping, Mapping], dict]  # (reference state dict, template) -> variables, through
                                                    # the model's own weight port
  create_state: Callable[[dict], Any]               # variables -> TrainState at step 0
  train_step: Any                                   # jitted (state, batch) -> (state, metrics)
  features: Any                                     # jitted (variables, images) -> flip-averaged,
                                                    # L2-normalised eval features


def project_training(spec) -> ProjectTraining:
  """The project's training code path configured as `spec` (a `Spec` or a `BoTSpec`)."""
  return _bot_training(spec) if isinstance(spec, spec_lib.BoTSpec) else _laga_training(spec)


def _training(config, spec, variables_from_reference: Callable) -> ProjectTraining:
  """Model, optimiser, one-device train step and eval features from `config`: the same calls as
  `laga_jax.trainer` (`build_models`, `make_optimizer`, `create_state`), without a dataset."""
  from laga_jax import config_utils, optim, trainer, xla_options
  from laga_jax import train as train_lib
  from laga_jax.evaluation import features as features_lib

  config.train.steps_per_epoch = spec.steps_per_epoch
  config.train.num_epochs = -(-spec.steps // spec.steps_per_epoch)
  config_utils.validate_config(config)
  # The model without BatchNorm synchronisation: the one-device step (equal to the pmap / shard_map step on
  # N devices, tests/test_train.py).
  module, _, model = trainer.build_models(config, spec.num_classes)
  tx = optim.make_optimizer(config.optim, spec.steps_per_epoch, backbone_pattern=module.BACKBONE_PATTERN,
                            num_epochs=config.train.num_epochs, loss_cfg=config.loss)
  step = jax.jit(train_lib.make_train_step(config.loss, axis_name=None),
                 compiler_options=xla_options.compiler_options(jax.default_backend()))
  feature_fn = trainer.eval_feature_fn(module, model)

  def create_state(variables):
    optim.param_labels(variables["params"], config.optim, module.BACKBONE_PATTERN)
    return train_lib.create_train_state(model, tx, variables, jax.random.PRNGKey(0))

  return ProjectTraining(
      model=model, to_variables=lambda state_dict, template: variables_from_reference(
          state_dict, template, module, config.model),
      create_state=create_state, train_step=step,
      features=jax.jit(functools.partial(features_lib.flip_sum_normalise, feature_fn, flip=config.eval.flip)))


def _laga_training(spec: spec_lib.Spec) -> ProjectTraining:
  """LAGA-Net from the base config at the spec's sizes, with the paper's loss and optimiser (eq. 8)."""
  from configs import base
  config = base.get_config()
  config.model.update(name="laga", stage_sizes=spec.stage_sizes, width=spec.width,
                      last_stride=spec.last_stride, num_stripes=spec.num_stripes,
                      reduction_dim=spec.reduction_dim, dropout=spec.dropout, leaky_slope=spec.leaky_slope,
                      shared_layer4=False, use_local=True, use_cam=True, use_sam_rpe=True, cam_energy="author",
                      rpe="diagonal", dtype="float32")
  config.data.image_size = tuple(spec.image)
  config.data.p, config.data.k = spec.p, spec.k
  config.loss.head_reduction = "sum"
  config.loss.ce.update(weight=1.0, label_smoothing=spec.label_smoothing)
  config.loss.triplet.update(weight=spec.triplet_beta, margin=spec.triplet_margin, soft=False, normalize=False,
                             feature="post_dropout")
  config.loss.center.weight = 0.0
  config.optim.update(name="adam", lr=spec.lr, schedule="warmup_multistep", warmup_start_lr=spec.warmup_start_lr,
                      warmup_epochs=spec.warmup_epochs, decay_epochs=spec.decay_epochs,
                      decay_factor=spec.decay_factor, param_groups=(("backbone", spec.backbone_lr_mult), (".*", 1.0)),
                      weight_decay=spec.weight_decay, b1=spec.b1, b2=spec.b2, eps=spec.eps)
  return _training(config, spec, lambda sd, template, module, model_cfg: variables_from_torch(
      sd, template, lambda state_dict, variables: module.pretrained_variables(state_dict, variables, model_cfg)))


def _bot_training(spec: spec_lib.BoTSpec) -> ProjectTraining:
  """configs/bot.py's recipe (model, loss, optimiser, no flip at evaluation) at the spec's sizes, with the
  reference's compressed schedule converted by `configs.bot.reference_schedule`."""
  from configs import bot as bot_configs
  config = bot_configs.get_config("market1501")
  config.model.update(stage_sizes=spec.stage_sizes, width=spec.width, last_stride=spec.last_stride,
                      dtype="float32")
  config.data.image_size = tuple(spec.image)
  config.data.p, config.data.k = spec.p, spec.k
  config.loss.ce.label_smoothing = spec.label_smoothing
  config.loss.triplet.margin = spec.triplet_margin
  config.loss.center.update(weight=spec.center_weight, lr=spec.center_lr)
  config.optim.update(weight_decay=spec.weight_decay, **bot_configs.reference_schedule(
      spec.lr, spec.warmup_factor, spec.warmup_iters, spec.milestones, spec.gamma))
  return _training(config, spec, bot_variables_from_torch)


# --- the reference's state dict -> the model's variables ----------------------------------------------------

def _classblock(sd: Mapping[str, np.ndarray], prefix: str) -> tuple:
  """The author's ClassBlock (add_block.0 Linear, add_block.1 BatchNorm1d, classifier.0 Linear)."""
  params = {"reduction": {"kernel": sd[f"{prefix}add_block.0.weight"].T, "bias": sd[f"{prefix}add_block.0.bias"]},
            "bn": {"scale": sd[f"{prefix}add_block.1.weight"], "bias": sd[f"{prefix}add_block.1.bias"]},
            "classifier": {"kernel": sd[f"{prefix}classifier.0.weight"].T,
                           "bias": sd[f"{prefix}classifier.0.bias"]}}
  stats = {"bn": {"mean": sd[f"{prefix}add_block.1.running_mean"], "var": sd[f"{prefix}add_block.1.running_var"]}}
  return params, stats


def variables_from_torch(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any],
                         pretrained_variables: Callable[..., dict]) -> Dict[str, Any]:
  """{"params", "batch_stats"} (float32 NumPy) from the reference's state dict; `template` gives the tree.

  The backbone and each layer4 copy go through the model's torchvision port (`pretrained_variables`, what
  users run on ImageNet weights): once per copy, with that copy's weights presented as torchvision's
  `layer4`. CAM and SAM-RPE go through `laga_jax.models.attention`'s converters of the author's modules.
  """
  from laga_jax.models import attention

  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  trunk = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  template = {c: template[c] for c in ("params", "batch_stats")}
  out = {"params": {}, "batch_stats": {}}
  for branch in BRANCHES:
    prefix = f"layer4_{branch}."
    resnet = dict(trunk, **{"layer4." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    ported = pretrained_variables(resnet, template)
    for c in out:
      out[c]["backbone"] = ported[c]["backbone"]
      out[c][f"layer4_{branch}"] = ported[c][f"layer4_{branch}"]
  for name in ("sam3", "sam4"):
    sam = attention.sam_rpe_variables_from_torch(sd, prefix=f"{name}.")
    for c in out:
      out[c][name] = sam[c]
  for name in ("cam3", "cam4"):
    out["params"][name] = attention.cam_variables_from_torch(sd, prefix=f"{name}.")["params"]
  for name in template["params"]:
    if name.startswith("head_"):
      out["params"][name], out["batch_stats"][name] = _classblock(sd, f"{name}.")
  out = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), out)
  _check_filled(out, template, sd)
  return out


def _check_filled(out: Mapping[str, Any], template: Mapping[str, Any], sd: Mapping[str, np.ndarray],
                  skipped: tuple = ()) -> None:
  """Raise unless `out` has the template's tree and shapes and every torch value (but `skipped`) went in."""
  expected = jax.tree_util.tree_map(lambda a: tuple(a.shape), {c: template[c] for c in ("params", "batch_stats")})
  got = jax.tree_util.tree_map(lambda a: tuple(a.shape), out)
  if expected != got:
    raise ValueError("the reference's state dict does not fill the JAX model's variables exactly")
  torch_values = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked") and k not in skipped)
  jax_values = sum(a.size for a in jax.tree_util.tree_leaves(out))
  if torch_values != jax_values:
    raise ValueError(f"the reference has {torch_values} values, the JAX model {jax_values}")


def bot_variables_from_torch(state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any], module,
                             model_cfg=None) -> Dict[str, Any]:
  """BoT's variables and center-loss centers from the reference run's state dict: the model through
  `laga_jax.models.bot.reference_variables` (the port of reid-strong-baseline checkpoints), the centers
  (C, D) as the loss's (1, C, D) parameter."""
  from laga_jax.optim import LOSS_PARAMS
  del model_cfg
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  centers = sd.pop(spec_lib.CENTERS_KEY)
  model_template = {"params": {k: v for k, v in template["params"].items() if k != LOSS_PARAMS},
                    "batch_stats": template["batch_stats"]}
  ported = module.reference_variables(sd, model_template, source="the torch BoT's state dict")
  out = {"params": dict(ported["params"], **{LOSS_PARAMS: {"centers": centers[None]}}),
         "batch_stats": ported["batch_stats"]}
  out = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), out)
  # The frozen BNNeck shift is zero and has no JAX parameter (reference_variables checks it).
  _check_filled(out, template, state_dict, skipped=spec_lib.ZEROED_KEYS["bot"])
  return out


def flat(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """{"params/backbone/conv1/kernel": array, ...} as float32 NumPy."""
  return {"/".join(path): np.asarray(leaf, np.float32)
          for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()}


def torch_run_in_jax_layout(torch_run: Mapping, template: Mapping[str, Any],
                            to_variables: Callable[[Mapping, Mapping], dict]) -> dict:
  """A torch run (state dicts in torch names) with its initial and final state mapped to flat JAX paths."""
  out = {k: torch_run[k] for k in spec_lib.SERIES + ("features",) if k in torch_run}
  for which in ("initial", "final"):
    out[which] = flat(to_variables(torch_run[which], template))
  return out


def run(spec, initial_state_dict: Mapping[str, np.ndarray], training: ProjectTraining = None,
        log: Callable[[str], None] = lambda _: None, compiler_options: Optional[dict] = None) -> dict:
  """The JAX trajectory from the reference's initial state dict: per-step metrics, final variables, features.

  The train step is compiled once and reused for every step. `compiler_options` go to XLA (the test lowers
  the backend optimisation level to compile faster).
  """
  training = training or project_training(spec)
  dummy = jnp.zeros((1,) + tuple(spec.image) + (3,), jnp.float32)
  template = jax.eval_shape(lambda: training.model.init(jax.random.PRNGKey(0), dummy, train=False))
  if isinstance(spec, spec_lib.BoTSpec):  # the center loss's own parameter, beside the model's
    from laga_jax.optim import LOSS_PARAMS
    centers = initial_state_dict[spec_lib.CENTERS_KEY]
    template = dict(template, params={**template["params"],
                                      LOSS_PARAMS: {"centers": jax.ShapeDtypeStruct((1,) + centers.shape,
                                                                                    jnp.float32)}})
  variables = training.to_variables(initial_state_dict, template)
  state = training.create_state(variables)
  data = spec_lib.batches(spec)
  step = training.train_step.lower(state, data[0]).compile(compiler_options=compiler_options)
  metrics = []
  for i, batch in enumerate(data):
    state, m = step(state, batch)
    metrics.append(jax.device_get(m))
    log(f"  JAX step {i:2d}: loss {float(m['loss']):.6f}")
  final = {"params": state.params, "batch_stats": state.batch_stats}
  images = jnp.asarray(spec_lib.eval_images(spec))
  model_variables = state.variables()  # without a loss's own parameters (BoT's centers)
  features = training.features.lower(model_variables, images).compile(
      compiler_options=compiler_options)(model_variables, images)
  series = {k: np.array([m[k] for m in metrics], np.float64) for k in spec_lib.SERIES if k in metrics[0]}
  return {**series, "features": np.asarray(features), "initial": flat(variables), "final": flat(final),
          "template": template}
