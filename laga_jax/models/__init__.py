"""The model registry: `config.model.name` selects one module of `laga_jax.models`.

Every model module follows one contract, so that the trainer, the evaluation, the weight port, the
checkpoints and the config checks never name a specific model:

  NAME                    the registry name (`config.model.name`).
  default_config()        a `ConfigDict` of the model's own `config.model` fields (with `name`).
  build(model_cfg, num_classes, *, bn_axis_name=None) -> flax.linen.Module
                          called as `module(images, train)` on NHWC float32 images; returns a dict with
                          "logits": (heads, B, num_classes) float32, stacked over the ID classifiers, and
                          one entry per feature tap in `FEATURE_TAPS`: (taps, B, D) float32. Train mode
                          uses `rngs={"dropout": ...}` and `mutable=["batch_stats"]`; BatchNorm is
                          `laga_jax.models.layers.BatchNorm(axis_name=bn_axis_name)`.
  eval_features(outputs)  (B, D): the un-normalised retrieval feature of eval-mode outputs.
  FEATURE_TAPS            names of the outputs a metric loss (triplet, center) may use.
  BACKBONE_PATTERN        regex over "/"-joined parameter paths matching the ImageNet-pretrained part;
                          the word "backbone" in `config.optim.param_groups` means this pattern.
  pretrained_variables(state_dict, variables, model_cfg) -> variables
                          a torchvision ResNet state dict mapped onto initialised variables.
  FINGERPRINT_FIELDS      the `config.model` fields that change the parameters' shapes or meaning.
  validate(model_cfg)     raise `laga_jax.config_utils.ConfigError` naming `--config.model.<field>`.

Optional:

  maps(model, variables, images, *, query_position=None) -> {name: (B, h, w) float32 array}
                          where the built model looks, for the map grids of `laga_jax.evaluation.maps`:
                          "act:<module>" activation maps, "sam:<module>@query=<row>,<col>" / "@mean" and
                          "cam:<module>" attention maps (`laga_jax.models.feature_maps`); `query_position` is
                          the (row, col) of a spatial-attention query. Without it: the activation maps of the
                          model's final ResNet stages (`feature_maps.activation_maps`).

Adding a model is one file here with these names, one line in `_MODULES`, and a config.
"""

import importlib
import types
from typing import Callable, Dict, Optional, Tuple

# name -> module path. Imported lazily: a run pays only for the model it uses.
_MODULES: Dict[str, str] = {
    "laga": "laga_jax.models.laga_net",
    "bot": "laga_jax.models.bot",
    "mba": "laga_jax.models.mba",
    "mgn": "laga_jax.models.mgn",
    "pcb": "laga_jax.models.pcb",
}

CONTRACT: Tuple[str, ...] = ("NAME", "default_config", "build", "eval_features", "FEATURE_TAPS",
                             "BACKBONE_PATTERN", "pretrained_variables", "FINGERPRINT_FIELDS", "validate")


def names() -> Tuple[str, ...]:
  """Registered model names, in registration order."""
  return tuple(_MODULES)


def get_model(name: str) -> types.ModuleType:
  """The model module registered as `name`, checked against the contract."""
  if name not in _MODULES:
    raise ValueError(f"--config.model.name={name!r}: expected one of {', '.join(map(repr, _MODULES))}")
  module = importlib.import_module(_MODULES[name])
  missing = [attr for attr in CONTRACT if not hasattr(module, attr)]
  if missing:
    raise TypeError(f"model module {module.__name__} lacks {', '.join(missing)} (see laga_jax/models/__init__.py)")
  return module


def maps_function(model) -> Callable:
  """The `maps` hook for the built Flax module `model`: the one of the registered model module that defines
  its class, else the default (activation maps of its final ResNet stages)."""
  for path in _MODULES.values():
    if type(model).__module__ == path:
      hook = getattr(importlib.import_module(path), "maps", None)
      if hook is not None:
        return hook
  from laga_jax.models import feature_maps
  return feature_maps.activation_maps


def torchvision_resnet(depth: int = 50, num_classes: Optional[int] = None):
  """The torchvision-layout ResNet every model's trunk is built from (not a registered model): what a
  pretrained ImageNet file is checked against before any model maps it (`laga_jax.weights`)."""
  from laga_jax.models import resnet
  return resnet.ResNet(resnet.stage_sizes_for_depth(depth), num_classes=num_classes)
