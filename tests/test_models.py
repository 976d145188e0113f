"""The model registry: every registered model follows the contract, learns a fixed batch through the real train
step, and no module outside `laga_jax/models/` names a specific model."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from laga_jax import config_utils, models, optim
from laga_jax import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = (64, 32)
NUM_CLASSES = 4


def test_registry_names_and_contract():
  assert models.names()[0] == "laga"
  for name in models.names():
    module = models.get_model(name)
    assert module.NAME == name
    assert module.default_config().name == name
    assert re.compile(module.BACKBONE_PATTERN)
    assert set(module.FINGERPRINT_FIELDS) <= set(module.default_config())
  with pytest.raises(ValueError, match=r"--config.model.name='resnet': expected one of 'laga'"):
    models.get_model("resnet")


def test_no_module_outside_models_names_a_model():
  """The trainer, evaluation, checkpoints, search and data never reach into `laga_jax/models/`: no import of
  (or reference to) any of its modules but the registry, and no attribute access to a registered model."""
  # Every module of the package (models and their building blocks), and every registered name.
  inside = sorted({p.stem for p in (ROOT / "laga_jax" / "models").glob("*.py") if p.stem != "__init__"}
                  | set(models.names()))
  alternatives = "|".join(inside)
  patterns = [re.compile(r"\bmodels\.(%s)\b" % alternatives),   # laga_jax.models.resnet, models.laga_net
              re.compile(r"from\s+laga_jax\.models\s+import\s+.*\b(%s)\b" % alternatives)]
  offenders = []
  for folder in ("laga_jax", "data_pipelines"):
    for path in (ROOT / folder).rglob("*.py"):
      if "models" in path.relative_to(ROOT).parts:
        continue
      for number, line in enumerate(path.read_text().splitlines(), 1):
        if any(p.search(line) for p in patterns):
          offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)
  # The patterns catch what they are for (so that an empty list above means something).
  for line in ("from laga_jax.models.attention import CAM", "from laga_jax.models import layers, resnet",
               "import laga_jax.models.feature_maps as fm", "module = models.laga_net", "models.bot.build"):
    assert any(p.search(line) for p in patterns), line
  for line in ("from laga_jax import models", "models.get_model(config.model.name)", "models.maps_function(m)"):
    assert not any(p.search(line) for p in patterns), line


def test_every_model_has_maps():
  """The registry's maps hook: activation maps of the final stages by default (one per branch), the attention
  maps where a model defines them."""
  expected = {"laga": ["act"] * 4 + ["cam"] * 2 + ["sam"] * 4, "bot": ["act"], "pcb": ["act"],
              "mgn": ["act"] * 3, "mba": ["act"] * 3 + ["cam"] * 2 + ["sam"] * 4}
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + IMAGE + (3,)), jnp.float32)
  drawn = {}
  for name in models.names():
    model, variables = _initialised(name)
    drawn[name] = models.maps_function(model)(model, variables, images)
    assert sorted(k.split(":")[0] for k in drawn[name]) == expected[name], (name, sorted(drawn[name]))
    assert all(v.shape[0] == 2 and v.ndim == 3 and np.isfinite(v).all() for v in drawn[name].values()), name
  assert [k for k in drawn["mba"] if k.startswith("act:")] == [
      "act:layer4[global]", "act:layer4[spatial]", "act:layer4[channel]"]
  assert sorted(drawn["mgn"]) == ["act:p1/layer4", "act:p2/layer4", "act:p3/layer4"]
  # A chosen SAM-RPE query changes that map only; one outside the map is named with the map's size.
  model, variables = _initialised("laga")
  corner = models.maps_function(model)(model, variables, images, query_position=(0, 0))
  centre = {k.split("=")[0]: v for k, v in drawn["laga"].items()}   # default query: the centre, (2, 1)
  assert sorted(k for k in corner if "@query" in k) == ["sam:sam3@query=0,0", "sam:sam4@query=0,0"]
  assert "sam:sam3@query=2,1" in drawn["laga"]
  for key, value in corner.items():
    same = np.allclose(value, centre[key.split("=")[0]])
    assert same != ("@query=" in key), key
  with pytest.raises(ValueError, match=r"--query_position=9,0: outside the 4x2 map of sam3 \(rows 0..3"):
    models.maps_function(model)(model, variables, images, query_position=(9, 0))


def _tiny_config(name: str):
  config = demo.get_config(name)
  config.data.image_size = IMAGE
  config.data.resize_size = (72, 36)
  config.data.p, config.data.k = 4, 2
  with config.model.ignore_type():
    for field, value in (("stage_sizes", (1, 1, 1, 1)), ("width", 8)):
      if field in config.model:
        config.model[field] = value
    if "num_parts" in config.model:  # PCB: at most one part per row of the stride-16 feature map
      config.model.num_parts = min(config.model.num_parts, IMAGE[0] // 16)
  return config


@functools.lru_cache(maxsize=None)
def _initialised(name: str):
  """(model, initial variables) of the tiny `name`, initialised once for this file: compiling a model's init
  costs several seconds, more than running it."""
  model = models.get_model(name).build(_tiny_config(name).model, NUM_CLASSES)
  images = jnp.zeros((1,) + IMAGE + (3,), jnp.float32)
  return model, jax.jit(lambda r: model.init(r, images, train=False))(jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", models.names())
def test_every_model_learns_a_fixed_batch(name):
  """Six steps of the real train step (the model's own losses and optimiser groups) lower its loss."""
  config = _tiny_config(name)
  config_utils.validate_config(config)
  module = models.get_model(name)
  model, variables = _initialised(name)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((8,) + IMAGE + (3,)), jnp.float32),
           "label": jnp.asarray(np.repeat(np.arange(NUM_CLASSES), 2), jnp.int32)}
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  outputs = jax.eval_shape(lambda v: model.apply(v, batch["image"], train=False), variables)
  assert outputs["logits"].shape[1:] == (8, NUM_CLASSES)
  assert jax.eval_shape(module.eval_features, outputs).shape[0] == 8
  if config.loss.center.weight > 0:
    tap = outputs[config.loss.center.feature].shape
    variables["params"] = dict(variables["params"], **{optim.LOSS_PARAMS: {
        "centers": jnp.zeros((tap[0], NUM_CLASSES, tap[2]), jnp.float32)}})
  optim_cfg = config.optim.copy_and_resolve_references()
  optim_cfg.warmup_epochs, optim_cfg.decay_epochs = 0, ()
  optim_cfg.schedule = "warmup_multistep"
  tx = optim.make_optimizer(optim_cfg, 100, backbone_pattern=module.BACKBONE_PATTERN,
                            num_epochs=config.train.num_epochs, loss_cfg=config.loss)
  state = train_lib.create_train_state(model, tx, variables, jax.random.PRNGKey(1))
  step = jax.jit(train_lib.make_train_step(config.loss, axis_name=None))
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.9 * losses[0], f"{name}: loss did not fall over 6 steps: {losses}"
