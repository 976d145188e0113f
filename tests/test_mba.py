"""MBA-Net against its public PyTorch reference (fixture written by tests/fixtures/reference/mba_fixture.py):
eval logits and eval/retrieval features, train-mode logits, pooled features and BN running statistics, all
within relative error 1e-4; the full-size model's shapes and parameter count (eval_shape); the configs; the
torchvision and reference weight ports; config checks."""

import importlib.util
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mba as mba_configs
from laga_jax import config_utils, models, weights
from laga_jax.models import mba

TESTS = pathlib.Path(__file__).parent
TOLERANCE = 1e-4
BN_MOMENTUM = 0.1  # torch's


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Plain NumPy modules shared with the torch-side fixture script (the script imports torch only in main()).
reference_weights = _load("reference_weights", TESTS / "reference_weights.py")
fixture_script = _load("mba_fixture", TESTS / "fixtures" / "reference" / "mba_fixture.py")


def rel_err(actual, expected) -> float:
  """max |actual - expected| / max |expected| (one scale per compared array)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


# --- the reference fixture ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref():
  with np.load(TESTS / "fixtures" / "mba_reference.npz", allow_pickle=False) as f:
    data = {k: f[k] for k in f.files}
  data["meta"] = json.loads(str(data["meta"]))
  data["state_dict"] = reference_weights.synthetic_state_dict(
      dict(zip(data["keys"].tolist(), json.loads(str(data["shapes"])))), data["meta"]["weight_seed"])
  data["stats"] = {k: data[f"stat_{i}"] for i, k in enumerate(data["stat_keys"].tolist())}
  return data


@pytest.fixture(scope="module")
def tiny(ref):
  """The fixture's architecture in JAX, its variables mapped from the reference state dict, the input."""
  meta = ref["meta"]
  cfg = mba.default_config()
  cfg.stage_sizes = tuple(meta["stage_sizes"])
  cfg.dropout = 0.0  # the reference's train-mode outputs were taken with dropout disabled
  model = mba.build(cfg, meta["num_classes"])
  x_nchw = fixture_script.make_input(meta["batch"], meta["image"], meta["input_seed"])
  assert np.isclose(x_nchw.astype(np.float64).sum(), float(ref["input_sum"]), rtol=1e-12)
  images = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  variables = mba.reference_variables(ref["state_dict"], template, source="mba_reference.npz")
  return model, variables, images


@pytest.fixture(scope="module")
def eval_both(tiny):
  """Eval-mode outputs of the images and of their horizontal flips, in one batch (eval mode is per image)."""
  model, variables, images = tiny
  both = jnp.concatenate([images, images[:, :, ::-1, :]])
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, both)


@pytest.fixture(scope="module")
def eval_out(tiny, eval_both):
  batch = tiny[2].shape[0]
  return {k: v[:, :batch] for k, v in eval_both.items()}


@pytest.fixture(scope="module")
def train_out(tiny):
  model, variables, images = tiny
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)


def test_fixture_is_small_and_describes_the_reference(ref):
  assert (TESTS / "fixtures" / "mba_reference.npz").stat().st_size < 1 << 20
  assert ref["meta"]["heads"] == ["global", "spatial", "channel"]
  assert ref["meta"]["rel_length"] == 8  # layer3 map of the 128 x 128 input: 8 x 8
  # Aliased tensors (layer4s, backbone.layer2c, ...) are stored once, under their first name.
  assert not any(mba._REFERENCE_ALIAS.match(k) for k in ref["keys"].tolist())


def test_reference_mapping_uses_every_tensor(ref, tiny):
  _, variables, _ = tiny
  num_values = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  expected = sum(v.size for k, v in ref["state_dict"].items() if not k.endswith("num_batches_tracked"))
  assert num_values == expected


def test_eval_logits_match_reference(ref, eval_out):
  for head, name in enumerate(ref["meta"]["heads"]):
    assert rel_err(eval_out["logits"][head], ref["eval_logits"][head]) <= TOLERANCE, name


def test_eval_feature_matches_reference(ref, eval_out):
  feature = mba.eval_features(eval_out)
  assert feature.shape == (ref["meta"]["batch"], 3 * 2048)
  # Per branch: the spatial branch's values are ~1e5 x the others' on these synthetic weights.
  for head, name in enumerate(ref["meta"]["heads"]):
    part = slice(2048 * head, 2048 * (head + 1))
    assert rel_err(feature[:, part], ref["eval_feature"][:, part]) <= TOLERANCE, name


def test_retrieval_feature_matches_reference(ref, tiny, eval_both):
  """What is ranked: eval feature of the image + of its flip, L2-normalised (as `flip_sum_normalise`, whose
  own test covers it, computes it; here from one compiled forward pass)."""
  batch = tiny[2].shape[0]
  flat = np.asarray(mba.eval_features(eval_both), np.float64)
  summed = flat[:batch] + flat[batch:]
  feature = summed / np.linalg.norm(summed, axis=-1, keepdims=True)
  for head, name in enumerate(ref["meta"]["heads"]):
    part = slice(2048 * head, 2048 * (head + 1))
    assert rel_err(feature[:, part], ref["retrieval_feature"][:, part]) <= TOLERANCE, name


def test_train_logits_and_features_match_reference(ref, train_out):
  outputs, _ = train_out
  assert set(outputs) == {"logits", *mba.FEATURE_TAPS}
  for head, name in enumerate(ref["meta"]["heads"]):
    assert rel_err(outputs["logits"][head], ref["train_logits"][head]) <= TOLERANCE, name
    assert rel_err(outputs["pooled"][head], ref["train_pooled"][head]) <= TOLERANCE, name
  for tap in ("post_dropout", "pre_dropout", "pre_bn"):
    assert outputs[tap].shape == (3, ref["meta"]["batch"], 2048), tap
  # Dropout is off here, so the classifier input equals the activation.
  np.testing.assert_array_equal(outputs["post_dropout"], outputs["pre_dropout"])


def test_train_mode_batch_statistics_match_reference(ref, tiny, train_out):
  """Every BN's running mean/var after one train forward; layer4's were updated three times (shared)."""
  _, variables, _ = tiny
  _, updates = train_out
  before = flax.traverse_util.flatten_dict(variables["batch_stats"])
  after = flax.traverse_util.flatten_dict(updates["batch_stats"])
  assert len(after) == len(ref["stats"])
  for path, value in after.items():
    key = mba._reference_key(path[:-1], "batch_stats", path[-1])
    # Compare what the batch contributed, undiluted by the (1 - momentum) x old value both sides share.
    old = np.asarray(before[path], np.float64)
    shared = 3 if path[0] == "layer4" else 1
    keep = (1 - BN_MOMENTUM) ** shared
    assert rel_err(np.asarray(value) - keep * old, ref["stats"][key] - keep * old) <= TOLERANCE, key


# --- full size (shapes only) --------------------------------------------------------------------------------

def bottleneck_params(c_in: int, inner: int, downsample: bool) -> int:
  c_out = 4 * inner
  convs = c_in * inner + 9 * inner * inner + inner * c_out
  return convs + 2 * (2 * inner + c_out) + ((c_in * c_out + 2 * c_out) if downsample else 0)


def resnet50_params_without_fc() -> int:
  total = 7 * 7 * 3 * 64 + 2 * 64
  c_in = 64
  for blocks, inner in zip((3, 4, 6, 3), (64, 128, 256, 512)):
    total += bottleneck_params(c_in, inner, True) + (blocks - 1) * bottleneck_params(4 * inner, inner, False)
    c_in = 4 * inner
  return total


def sam_rpe_params(c: int, length: int) -> int:
  """Q, K (1x1 conv with bias C -> C/8, BN), V (C -> C, BN), R_H and R_W ((2L - 1) x C/8), 2 BN(C), gamma."""
  d = c // 8
  return 2 * (c * d + d + 2 * d) + (c * c + c + 2 * c) + 2 * (2 * length - 1) * d + 2 * 2 * c + 1


def head_params(features: int, bottleneck: int, classes: int) -> int:
  """ClassBlock: Linear(features -> bottleneck) + BN1d + Linear(bottleneck -> classes)."""
  return features * bottleneck + bottleneck + 2 * bottleneck + bottleneck * classes + classes


def test_resnet50_formula_is_torchvisions():
  assert resnet50_params_without_fc() == 25_557_032 - (2048 * 1000 + 1000)


def test_full_size_market_model_shapes_and_parameter_count():
  config = mba_configs.get_config("market1501")
  num_classes = 751
  model = mba.build(config.model, num_classes)
  x = jax.ShapeDtypeStruct((2,) + tuple(config.data.image_size) + (3,), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), x)
  assert outputs["logits"].shape == (3, 2, num_classes)
  assert jax.eval_shape(mba.eval_features, outputs).shape == (2, 6144)
  # 384 x 128 -> layer3 / layer4 maps 24 x 8 (last stride 1): L = 24. One layer4, shared by three branches.
  expected = (resnet50_params_without_fc() + sam_rpe_params(1024, 24) + sam_rpe_params(2048, 24) + 2
              + 3 * head_params(2048, 2048, num_classes))
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
  assert count == expected


# --- configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(mba_configs.DATASETS))
def test_configs(dataset):
  config = mba_configs.get_config(dataset)
  assert config.model.name == "mba"
  mba.validate(config.model)
  assert config.loss.ce.weight == 1.0 and config.loss.triplet.weight == 0.0
  assert config.loss.ce.label_smoothing == 0.1
  hand = dataset.startswith("11k") or dataset == "hd"
  assert config.data.kind == ("hand" if hand else "body")
  if hand:
    assert tuple(config.data.image_size) == (324, 324) and config.train.select_best
  if dataset != "demo":
    assert (config.data.p, config.data.k) == (4, 1)
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adam", 8e-4, 5e-4)
    assert tuple(config.optim.decay_epochs) == (40, 60) and config.train.num_epochs == 70


def test_config_rejects_unknown_dataset():
  with pytest.raises(ValueError, match="configs/mba.py:market"):
    mba_configs.get_config("market")


# --- contract, weights, checks ------------------------------------------------------------------------------

def test_registered_under_its_name():
  assert models.get_model("mba") is mba
  assert mba.NAME == "mba" == mba.default_config().name
  assert set(mba.FINGERPRINT_FIELDS) <= set(mba.default_config())


def test_backbone_pattern_covers_the_torchvision_part(tiny):
  import re
  _, variables, _ = tiny
  paths = ["/".join(p) for p in flax.traverse_util.flatten_dict(variables["params"])]
  backbone = {p for p in paths if re.search(mba.BACKBONE_PATTERN, p)}
  assert backbone == {p for p in paths if p.split("/")[0] in ("backbone", "layer4")}


def test_pretrained_variables_fill_stem_to_layer4(tiny):
  _, variables, _ = tiny
  state_dict = reference_weights.synthetic_state_dict(
      weights.torchvision_resnet_shapes((1, 1, 1, 1), num_classes=1000), seed=3)
  ported = mba.pretrained_variables(state_dict, variables, None)
  assert jax.tree_util.tree_structure(ported) == jax.tree_util.tree_structure(variables)
  np.testing.assert_array_equal(ported["params"]["layer4"]["block0"]["conv2"]["kernel"],
                                state_dict["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ported["batch_stats"]["backbone"]["bn1"]["var"], state_dict["bn1.running_var"])
  # Attention modules and heads keep what they had.
  for name in ("sam3", "cam4", "head_channel"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, ported["params"][name], variables["params"][name])


def test_pretrained_variables_name_a_mismatched_file(tiny):
  _, variables, _ = tiny
  state_dict = reference_weights.synthetic_state_dict(weights.torchvision_resnet_shapes((1, 1, 2, 1)))
  with pytest.raises(weights.WeightsError, match="layer3.1"):
    mba.pretrained_variables(state_dict, variables, None)


@pytest.mark.parametrize("field, value", [("rpe", "row"), ("cam_energy", "plus"), ("last_stride", 3),
                                          ("stage_sizes", (1, 1, 1)), ("depth", 34), ("reduction_dim", 0),
                                          ("dropout", 1.0)])
def test_validate_names_the_field(field, value):
  cfg = mba.default_config()
  cfg[field] = value
  with pytest.raises(config_utils.ConfigError, match=f"--config.model.{field}="):
    mba.validate(cfg)


def test_global_only_variant_has_one_head():
  cfg = mba.default_config()
  cfg.update(stage_sizes=(1, 1, 1, 1), width=8, use_attention=False, reduction_dim=16)
  model = mba.build(cfg, 3)
  x = jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  assert set(variables["params"]) == {"backbone", "layer4", "head_global"}
  outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert outputs["logits"].shape == (1, 2, 3) and jax.eval_shape(mba.eval_features, outputs).shape == (2, 256)
