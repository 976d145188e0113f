"""PCB / PCB+RPP: forward pass against the authors' code (tests/fixtures/pcb_reference.npz, written by
tests/fixtures/reference/pcb_fixture.py), full-size shapes and parameter counts, stripe windows, weight ports and
config checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_weights
from configs import pcb as pcb_configs
from laga_jax import models, weights
from laga_jax.config_utils import ConfigError
from laga_jax.models import pcb

TOLERANCE = 1e-4
MARKET_IDS = 751


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected| (scale-relative, robust to near-zero entries)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --- the authors' code on synthetic weights -----------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(fixtures_dir):
  with np.load(fixtures_dir / "pcb_reference.npz") as f:
    return {k: f[k] for k in f.files}


def _state_dict(ref: dict, prefix: str) -> dict:
  keys = json.loads(str(ref[f"{prefix}keys"]))
  shapes = json.loads(str(ref[f"{prefix}shapes"]))
  return reference_weights.synthetic_state_dict(dict(zip(keys, shapes)), int(ref["seed"]))


def _images(ref: dict) -> jax.Array:
  nchw = np.random.default_rng(int(ref["input_seed"])).standard_normal(tuple(ref["input_shape"]))
  return jnp.asarray(nchw.astype(np.float32).transpose(0, 2, 3, 1))


def _tiny_config(ref: dict, rpp: bool):
  cfg = pcb.default_config()
  cfg.stage_sizes = tuple(int(s) for s in ref["stage_sizes"])
  cfg.rpp = rpp
  cfg.dropout = 0.0  # the fixture's train-mode forward ran with dropout disabled
  return cfg


@pytest.fixture(scope="module", params=["pcb", "rpp"])
def ported(request, reference):
  """(prefix, eval outputs and intermediates, train outputs and BN statistics) of the PCB / the RPP model with
  the authors' synthetic state dict mapped onto it: one compiled function per model."""
  prefix = request.param + "_"
  num_classes = reference[f"{prefix}eval_logits"].shape[-1]
  model = pcb.build(_tiny_config(reference, request.param == "rpp"), num_classes)
  images = _images(reference)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  variables = pcb.author_variables(_state_dict(reference, prefix), template)

  @jax.jit
  def forward(v, x):
    return (model.apply(v, x, train=False, mutable=["intermediates"]),
            model.apply(v, x, train=True, mutable=["batch_stats"]))

  evaluated, trained = forward(variables, images)
  return prefix, evaluated, trained


def test_eval_matches_reference(ported, reference):
  prefix, (outputs, state), _ = ported
  batch, parts = outputs["logits"].shape[1], outputs["logits"].shape[0]
  # The authors flatten (B, C, parts, 1) channel-major; ours is part-major: the same coordinates.
  expected = reference[f"{prefix}eval_feature"].reshape(batch, -1, parts).transpose(0, 2, 1).reshape(batch, -1)
  errors = {"eval_feature": relative_error(pcb.eval_features(outputs), expected),
            "eval_logits": relative_error(outputs["logits"], reference[f"{prefix}eval_logits"])}
  if prefix == "rpp_":
    part_weights = state["intermediates"]["part_weights"][0]
    errors["eval_part_weights"] = relative_error(part_weights.transpose(0, 3, 1, 2),
                                                 reference["rpp_eval_part_weights"])
  else:
    assert "part_weights" not in state.get("intermediates", {})
  print(prefix, errors)
  assert max(errors.values()) <= TOLERANCE, errors


def test_train_matches_reference(ported, reference):
  prefix, _, (outputs, mutated) = ported
  errors = {"train_logits": relative_error(outputs["logits"], reference[f"{prefix}train_logits"])}
  stats = {}
  for path, value in jax.tree_util.tree_leaves_with_path(mutated["batch_stats"]):
    names = tuple(p.key for p in path)
    stats[prefix + "stats/" + pcb._author_key(names[:-1], "batch_stats", names[-1])] = value
  expected_keys = {k for k in reference if k.startswith(prefix + "stats/")}
  assert set(stats) == expected_keys
  errors["running_stats"] = max(relative_error(stats[k], reference[k]) for k in expected_keys)
  print(prefix, errors)
  assert max(errors.values()) <= TOLERANCE, errors


# --- architecture ------------------------------------------------------------------------------------------

def resnet50_params_without_fc() -> int:
  """Conv kernels and BN scale/shift of torchvision's ResNet-50, written from the architecture."""
  def bottleneck(c_in, inner, downsample):
    out = 4 * inner
    n = c_in * inner + 9 * inner * inner + inner * out + 2 * (inner + inner + out)
    return n + (c_in * out + 2 * out if downsample else 0)

  total = 7 * 7 * 3 * 64 + 2 * 64
  c_in = 64
  for blocks, inner in zip((3, 4, 6, 3), (64, 128, 256, 512)):
    total += bottleneck(c_in, inner, True) + (blocks - 1) * bottleneck(4 * inner, inner, False)
    c_in = 4 * inner
  return total


def test_full_size_shapes_and_parameter_count():
  pcb_config, rpp_config = pcb_configs.get_config("market1501"), pcb_configs.get_config("market1501_rpp")
  stage_fields = ("rpp", "init_from")
  assert ({k: v for k, v in pcb_config.model.items() if k not in stage_fields}
          == {k: v for k, v in rpp_config.model.items() if k not in stage_fields})
  assert tuple(pcb_config.data.image_size) == (384, 128)
  model = pcb.build(rpp_config.model, MARKET_IDS)

  def init_and_apply(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  images = jax.ShapeDtypeStruct((2, 384, 128, 3), jnp.float32)
  variables, outputs = jax.eval_shape(init_and_apply, images)
  assert resnet50_params_without_fc() == 25_557_032 - (2048 * 1000 + 1000)
  # 1x1 conv 2048 -> 256 (no bias), BN(256), 6 classifiers 256 -> 751 (+ bias); RPP: 1x1 conv 256 -> 6 (+ bias).
  expected_pcb = resnet50_params_without_fc() + 2048 * 256 + 2 * 256 + 6 * (256 * MARKET_IDS + MARKET_IDS)
  count = {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
           for name, tree in variables["params"].items()}
  assert sum(count.values()) == expected_pcb + 256 * 6 + 6
  assert sum(count.values()) - count["rpp"] == expected_pcb   # the PCB model: everything but RPP's classifier
  assert outputs["logits"].shape == (6, 2, MARKET_IDS)
  assert outputs["pooled"].shape == (6, 2, 2048)
  assert outputs["reduced"].shape == outputs["pre_bn"].shape == (6, 2, 256)
  assert jax.eval_shape(pcb.eval_features, outputs).shape == (2, 6 * 2048)


def test_stripe_windows_follow_the_authors_pooling():
  assert pcb.stripe_windows(24, 6) == (4, 4)   # 384 x 128 input: 6 equal stripes of 4 rows
  assert pcb.stripe_windows(8, 6) == (1, 3)    # 128 x 64 (demo): overlapping windows
  with pytest.raises(ValueError, match="num_parts"):
    pcb.stripe_windows(5, 6)
  x = np.random.default_rng(0).standard_normal((2, 8, 3, 5)).astype(np.float32)
  pooled = np.asarray(pcb.stripe_pool(jnp.asarray(x), 6))
  expected = np.stack([x[:, i:i + 3].mean(axis=(1, 2)) for i in range(6)])
  np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


def test_contract_and_registry():
  assert models.get_model("pcb") is pcb
  assert set(pcb.FINGERPRINT_FIELDS) <= set(pcb.default_config())
  for arg in ("market1501", "dukemtmc", "msmt17", "cuhk03_labeled", "cuhk03_detected", "demo",
              "market1501_rpp", "msmt17_rpp_finetune"):
    config = pcb_configs.get_config(arg)
    assert config.model.name == "pcb"
    assert config.model.rpp == ("_rpp" in arg)
    if config.model.rpp:
      # The RPP stages start from the previous stage's workdir, which must exist when the run starts.
      assert config.model.init_from.startswith("runs/pcb_")
      with pytest.raises(ConfigError, match="model.init_from"):
        pcb.validate(config.model)
      config.model.init_from = ""
    pcb.validate(config.model)


def test_validate_names_the_field():
  cfg = pcb.default_config()
  cfg.rpp_dim = 300
  with pytest.raises(ConfigError, match="model.rpp_dim"):
    pcb.validate(cfg)
  cfg = pcb.default_config()
  cfg.num_parts = 0
  with pytest.raises(ConfigError, match="model.num_parts"):
    pcb.validate(cfg)


def test_pretrained_variables_fill_the_backbone_only():
  cfg = pcb.default_config()
  cfg.stage_sizes = (1, 1, 1, 1)
  cfg.width = 8
  cfg.rpp = True
  cfg.rpp_dim = 32
  model = pcb.build(cfg, 3)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 32, 3)), train=False))
  shapes = weights.torchvision_resnet_shapes((1, 1, 1, 1), 8, num_classes=1000)
  state_dict = reference_weights.synthetic_state_dict(shapes, 3)
  ported = pcb.pretrained_variables(state_dict, template, cfg)
  np.testing.assert_array_equal(ported["params"]["backbone"]["layer4"]["block0"]["conv2"]["kernel"],
                                state_dict["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ported["batch_stats"]["backbone"]["bn1"]["var"], state_dict["bn1.running_var"])
  # Heads keep their initialisation (still abstract here: nothing was written into them).
  for name in ("reduction", "reduction_bn", "classifier0", "rpp"):
    assert all(isinstance(leaf, jax.ShapeDtypeStruct)
               for leaf in jax.tree_util.tree_leaves(ported["params"][name]))
  del state_dict["layer2.0.conv1.weight"]
  with pytest.raises(weights.WeightsError, match="layer2.0.conv1.weight"):
    pcb.pretrained_variables(state_dict, template, cfg)
