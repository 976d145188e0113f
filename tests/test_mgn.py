"""MGN against its reference implementation (seathiefwang/MGN-pytorch) on synthetic weights, full-size shapes
and parameter count, the torchvision weight port, configs and config checks.

The fixture (tests/fixtures/mgn_reference.npz) is written by tests/fixtures/reference/mgn_fixture.py; it stores
state-dict keys and shapes, and both sides rebuild the weights with `reference_weights.synthetic_state_dict`.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_weights
from laga_jax import config_utils, models, weights
from laga_jax.models import mgn

TOLERANCE = 1e-4  # relative error: max |jax - reference| / max |reference|


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --- the reference fixture ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  return np.load(fixtures_dir / "mgn_reference.npz")


@pytest.fixture(scope="module")
def reference_state_dict(fixture):
  shapes = {key: tuple(int(n) for n in shape.split(",")) if shape else ()
            for key, shape in zip(fixture["keys"].tolist(), fixture["shapes"].tolist())}
  return reference_weights.synthetic_state_dict(shapes, int(fixture["seed"]))


@pytest.fixture(scope="module")
def small_model(fixture):
  cfg = mgn.default_config()
  cfg.stage_sizes = tuple(int(s) for s in fixture["stage_sizes"])
  return mgn.build(cfg, int(fixture["num_classes"]))


@pytest.fixture(scope="module")
def images(fixture):
  """The fixture script's `make_input`: seeded N(0, 1) noise x per-image scale + per-image-channel offset."""
  noise = np.random.default_rng(int(fixture["input_seed"])).standard_normal(tuple(fixture["input_shape"]))
  nchw = noise * fixture["input_scale"][:, None, None, None] + fixture["input_offset"][:, :, None, None]
  return nchw.astype(np.float32).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def variables(small_model, reference_state_dict, images):
  template = jax.eval_shape(lambda x: small_model.init(jax.random.PRNGKey(0), x, train=False),
                            jnp.zeros((1,) + images.shape[1:]))
  return mgn.reference_variables(reference_state_dict, template, source="synthetic reference state dict")


@pytest.fixture(scope="module")
def eval_outputs(small_model, variables, images):
  """Eval mode on the images and their mirror images in one batch (one compile), with the branch maps."""
  both = np.concatenate([images, images[:, :, ::-1]])
  apply = jax.jit(lambda v, x: small_model.apply(v, x, train=False, capture_intermediates=(
      lambda module, _: module.name in ("p1", "p2", "p3"))))
  outputs, state = jax.device_get(apply(variables, both))
  maps = {name: state["intermediates"][name]["__call__"][0] for name in ("p1", "p2", "p3")}
  return outputs, maps


@pytest.fixture(scope="module")
def train_outputs(small_model, variables, images):
  apply = jax.jit(lambda v, x: small_model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.device_get(apply(variables, images))


def retrieval(features: np.ndarray, batch: int) -> np.ndarray:
  """feature(x) + feature(mirrored x), L2-normalised: what `laga_jax.evaluation.features` ranks."""
  summed = features[:batch] + features[batch:]
  return summed / np.linalg.norm(summed, axis=1, keepdims=True)


def test_reference_state_dict_maps_onto_every_variable(reference_state_dict, variables):
  flat = flax.traverse_util.flatten_dict(variables)
  assert all(isinstance(leaf, jax.Array) for leaf in flat.values())  # none left as a template
  used = {mgn._reference_key(path[1:-1], path[0], path[-1]) for path in flat}
  assert used == {k for k in reference_state_dict if not k.endswith("num_batches_tracked")}


def test_eval_feature_matches_reference(fixture, eval_outputs, images):
  outputs, _ = eval_outputs
  batch = len(images)
  features = np.asarray(mgn.eval_features(outputs))
  assert features.shape == (2 * batch, 2048)
  errors = {"predict": relative_error(features[:batch], fixture["eval_predict"]),
            "retrieval": relative_error(retrieval(features, batch), fixture["eval_retrieval"]),
            "logits": relative_error(outputs["logits"][:, :batch], fixture["eval_logits"])}
  assert max(errors.values()) <= TOLERANCE, errors


def test_max_pooling_matches_reference(fixture, small_model, variables, eval_outputs, images):
  """`pool='max'` (the paper's pooling) on the same branch maps: pooling, stripes and heads vs the reference."""
  _, maps = eval_outputs
  pooled = [mgn.pool(maps[b], "max") for b in ("p1", "p2", "p3")]
  for branch, stripes in (("p2", 2), ("p3", 3)):
    pooled += [mgn.pool(maps[branch][:, s:e], "max") for s, e in mgn.stripe_bounds(maps[branch].shape[1], stripes)]
  features, logits = [], []
  for name, vector in zip(small_model.head_names, pooled):
    head = mgn.Head(small_model.num_classes, small_model.reduction_dim)
    f, l = head.apply({c: variables[c][f"head_{name}"] for c in ("params", "batch_stats")}, vector, False)
    features.append(np.asarray(f))
    logits.append(np.asarray(l))
  features = np.concatenate(features, axis=1)
  batch = len(images)
  errors = {"predict": relative_error(features[:batch], fixture["max_eval_predict"]),
            "retrieval": relative_error(retrieval(features, batch), fixture["max_eval_retrieval"]),
            "logits": relative_error(np.stack(logits)[:, :batch], fixture["max_eval_logits"])}
  assert max(errors.values()) <= TOLERANCE, errors


def test_train_mode_matches_reference(fixture, train_outputs):
  outputs, mutated = train_outputs
  errors = {"logits": relative_error(outputs["logits"], fixture["train_logits"]),
            "global": relative_error(outputs["global"], fixture["train_global"])}
  stats = {mgn._reference_key(path[:-1], "batch_stats", path[-1]): value
           for path, value in flax.traverse_util.flatten_dict(mutated["batch_stats"]).items()}
  for name in fixture.files:
    if name.startswith("stat:"):
      errors[name] = relative_error(stats[name[len("stat:"):]], fixture[name])
  assert len(errors) == 2 + 2 * 13
  assert max(errors.values()) <= TOLERANCE, errors


def test_outputs_layout(small_model, eval_outputs, images):
  outputs, maps = eval_outputs
  n, classes = 2 * len(images), small_model.num_classes
  assert small_model.head_names == ("g_p1", "g_p2", "g_p3", "p2_0", "p2_1", "p3_0", "p3_1", "p3_2")
  assert outputs["logits"].shape == (8, n, classes)
  assert outputs["reduced"].shape == (8, n, 256) and outputs["pooled"].shape == (8, n, 2048)
  np.testing.assert_array_equal(outputs["global"], outputs["reduced"][:3])
  assert set(mgn.FEATURE_TAPS) <= set(outputs)
  # The global branch keeps layer4's stride 2, the part branches have stride 1 (384x128 -> 12x4 and 24x8).
  assert maps["p1"].shape[1:3] == (12, 4) and maps["p2"].shape[1:3] == maps["p3"].shape[1:3] == (24, 8)


# --- full size: shapes and parameter count written from the architecture --------------------------------------

def bottleneck_params(c_in: int, inner: int, downsample: bool) -> int:
  c_out = 4 * inner
  convs = c_in * inner + 9 * inner * inner + inner * c_out
  bns = 2 * (inner + inner + c_out)
  return convs + bns + ((c_in * c_out + 2 * c_out) if downsample else 0)


def mgn_params(classes: int, reduction: int = 256) -> int:
  """ResNet-50 without fc, two more copies of layer3 blocks 1-5 and of layer4, 8 reduction heads."""
  stem = 7 * 7 * 3 * 64 + 2 * 64
  layer1 = bottleneck_params(64, 64, True) + 2 * bottleneck_params(256, 64, False)
  layer2 = bottleneck_params(256, 128, True) + 3 * bottleneck_params(512, 128, False)
  layer3_block0 = bottleneck_params(512, 256, True)
  layer3_tail = 5 * bottleneck_params(1024, 256, False)
  layer4 = bottleneck_params(1024, 512, True) + 2 * bottleneck_params(2048, 512, False)
  assert stem + layer1 + layer2 + layer3_block0 + layer3_tail + layer4 == 25_557_032 - 2_049_000  # torchvision
  head = 2048 * reduction + 2 * reduction + reduction * classes + classes
  return stem + layer1 + layer2 + layer3_block0 + 3 * (layer3_tail + layer4) + 8 * head


def test_full_size_market_shapes_and_parameter_count():
  from configs import mgn as mgn_configs
  config = mgn_configs.get_config("market1501")
  model = models.get_model(config.model.name).build(config.model, 751)
  x = jax.ShapeDtypeStruct((2,) + tuple(config.data.image_size) + (3,), jnp.float32)
  outputs, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), x)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
  assert count == mgn_params(751) == 70_351_800
  features = jax.eval_shape(mgn.eval_features, outputs)
  assert features.shape == (2, 2048)
  assert outputs["logits"].shape == (8, 2, 751) and outputs["global"].shape == (3, 2, 256)


# --- torchvision weights -------------------------------------------------------------------------------------

def test_pretrained_variables_copy_torchvision_into_every_branch():
  cfg = mgn.default_config()
  cfg.stage_sizes, cfg.width = (1, 1, 2, 2), 8
  model = mgn.build(cfg, 3)
  template = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), jnp.zeros((1, 96, 32, 3)))
  shapes = weights.torchvision_resnet_shapes(cfg.stage_sizes, cfg.width, num_classes=10)
  state_dict = reference_weights.synthetic_state_dict(shapes, seed=3)
  ported = mgn.pretrained_variables(state_dict, template, cfg)
  params, stats = ported["params"], ported["batch_stats"]
  np.testing.assert_array_equal(params["backbone"]["layer3"]["block0"]["conv2"]["kernel"],
                                state_dict["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
  for branch in ("p1", "p2", "p3"):
    np.testing.assert_array_equal(params[branch]["layer3"]["block1"]["conv1"]["kernel"],
                                  state_dict["layer3.1.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params[branch]["layer4"]["block1"]["conv2"]["kernel"],
                                  state_dict["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats[branch]["layer4"]["block0"]["downsample_bn"]["var"],
                                  state_dict["layer4.0.downsample.1.running_var"])
  # The heads keep their initialisation (still abstract here); `fc` is ignored.
  assert isinstance(params["head_g_p1"]["conv"]["kernel"], jax.ShapeDtypeStruct)
  with pytest.raises(weights.WeightsError, match="layer4.1.conv2.weight"):
    del state_dict["layer4.1.conv2.weight"]
    mgn.pretrained_variables(state_dict, template, cfg)


def test_backbone_pattern_covers_exactly_the_resnet_copies(variables):
  import re
  paths = ["/".join(p) for p in flax.traverse_util.flatten_dict(variables["params"])]
  backbone = {p for p in paths if re.search(mgn.BACKBONE_PATTERN, p)}
  assert backbone and all(p.split("/")[0] in ("backbone", "p1", "p2", "p3") for p in backbone)
  assert all(p.startswith("head_") for p in set(paths) - backbone)


# --- pooling, configs, checks --------------------------------------------------------------------------------

def test_stripes_are_the_reference_windows_when_they_divide_the_map():
  assert mgn.stripe_bounds(24, 2) == [(0, 12), (12, 24)]       # MaxPool2d/AvgPool2d kernel (12, 8)
  assert mgn.stripe_bounds(24, 3) == [(0, 8), (8, 16), (16, 24)]  # kernel (8, 8)
  assert mgn.stripe_bounds(8, 3) == [(0, 3), (2, 6), (5, 8)]   # adaptive pooling's overlap otherwise
  with pytest.raises(ValueError, match="part_stripes"):
    mgn.stripe_bounds(2, 3)


@pytest.mark.parametrize("arg", ["market1501", "dukemtmc", "msmt17", "cuhk03_labeled", "cuhk03_detected", "demo"])
def test_configs_are_valid(arg):
  from configs import mgn as mgn_configs
  config = mgn_configs.get_config(arg)
  config_utils.validate_config(config)
  assert config.model.name == "mgn" and config.loss.head_reduction == "mean"
  assert config.loss.triplet.feature == "global"
  if arg != "demo":
    assert config.data.name == arg and tuple(config.data.image_size) == (384, 128)
    assert config.data.p * config.data.k == 64 and config.optim.lr == 2e-4


def test_contract_and_validation():
  module = models.get_model("mgn")
  assert module is mgn and mgn.NAME == "mgn"
  good = mgn.default_config()
  mgn.validate(good)
  for field, value in (("pool", "mean"), ("part_stripes", (2, 0)), ("reduction_dim", 0),
                       ("stage_sizes", (1, 1, 1)), ("depth", 34)):
    bad = mgn.default_config()
    bad[field] = value
    with pytest.raises(config_utils.ConfigError, match=f"--config.model.{field}="):
      mgn.validate(bad)
