"""LAGA-Net: full-size shapes and parameter counts (eval_shape), ablation presets, a tiny model's forward in
train/eval mode, local stripes, head order, the author-code head fixture, pretrained layer4 copies, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablation, base
from laga_jax import weights
from laga_jax.models import laga_net

NUM_CLASSES = 5
TINY_IMAGE = (96, 32)  # layer3 / layer4 maps: 6 x 2
RESNET50_WITHOUT_FC = 25_557_032 - (2048 * 1000 + 1000)
# Compile options for `init` only: its run time is irrelevant and XLA's backend optimisation of the many
# random-number kernels dominates its compile time on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- parameter counts written from the architecture (not from the code under test) --------------------------

def bottleneck_params(c_in: int, inner: int, downsample: bool) -> int:
  c_out = 4 * inner
  convs = c_in * inner + 9 * inner * inner + inner * c_out
  bns = 2 * (inner + inner + c_out)
  return convs + bns + ((c_in * c_out + 2 * c_out) if downsample else 0)


def stage_params(blocks: int, c_in: int, inner: int) -> int:
  return bottleneck_params(c_in, inner, True) + (blocks - 1) * bottleneck_params(4 * inner, inner, False)


def trunk_params(stage_sizes, width: int) -> int:
  stem = 7 * 7 * 3 * width + 2 * width
  c_in = [width, 4 * width, 8 * width]
  return stem + sum(stage_params(stage_sizes[i], c_in[i], width * 2**i) for i in range(3))


def layer4_params(stage_sizes, width: int) -> int:
  return stage_params(stage_sizes[3], 16 * width, 8 * width)


def sam_rpe_params(c: int, length: int) -> int:
  d = c // 8
  qk = 2 * (c * d + d + 2 * d)
  v = c * c + c + 2 * c
  return qk + v + 2 * (2 * length - 1) * d + 2 * (2 * c) + 1


def head_params(features: int, reduction: int, classes: int) -> int:
  return features * reduction + reduction + 2 * reduction + reduction * classes + classes


def laga_params(stage_sizes, width, reduction, classes, length, *, use_local=True, use_cam=True,
                use_sam_rpe=True, shared_layer4=False, num_stripes=3) -> int:
  pooled = 32 * width
  branches = 1 + use_local + use_cam + use_sam_rpe
  heads = 1 + use_local * num_stripes + use_cam + use_sam_rpe
  total = trunk_params(stage_sizes, width)
  total += layer4_params(stage_sizes, width) * (1 if shared_layer4 else branches)
  total += use_sam_rpe * (sam_rpe_params(16 * width, length) + sam_rpe_params(32 * width, length))
  total += use_cam * 2  # CAM has one gamma
  return total + heads * head_params(pooled, reduction, classes)


def test_architecture_formula_matches_torchvision_resnet50():
  assert trunk_params((3, 4, 6, 3), 64) + layer4_params((3, 4, 6, 3), 64) == RESNET50_WITHOUT_FC


# --- full size (shapes only) --------------------------------------------------------------------------------

def model_config(**overrides):
  config = base.get_config().model
  config.update(overrides)
  return config


def abstract_init(model, image, batch=2):
  x = jax.ShapeDtypeStruct((batch,) + tuple(image) + (3,), jnp.float32)
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), x)


@pytest.mark.parametrize("image, classes, length", [((384, 128), 751, 24), ((324, 324), 71, 21)])
def test_full_size_shapes_and_param_count(image, classes, length):
  model = laga_net.from_config(model_config(), classes)
  outputs, variables = abstract_init(model, image)
  assert outputs["logits"].shape == (6, 2, classes)
  assert outputs["embeddings"].shape == (6, 2, 1024)
  assert outputs["pooled"].shape == (6, 2, 2048)
  assert {o.dtype for o in outputs.values()} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(laga_net.eval_features, outputs).shape == (2, 6 * 2048)
  params = variables["params"]
  assert laga_net.count_params(params) == laga_params((3, 4, 6, 3), 64, 1024, classes, length)
  assert params["sam3"]["rel_height"].shape == (2 * length - 1, 128)
  assert params["sam4"]["rel_width"].shape == (2 * length - 1, 256)


def test_shared_layer4_has_one_copy():
  model = laga_net.from_config(model_config(shared_layer4=True, reduction_dim=2048), 751)
  outputs, variables = abstract_init(model, (384, 128), batch=1)
  layer4 = [name for name in variables["params"] if name.startswith("layer4")]
  assert layer4 == ["layer4"]
  assert layer4 == [name for name in variables["batch_stats"] if name.startswith("layer4")]
  assert outputs["embeddings"].shape == (6, 1, 2048)
  assert laga_net.count_params(variables["params"]) == laga_params(
      (3, 4, 6, 3), 64, 2048, 751, 24, shared_layer4=True)


@pytest.mark.parametrize("row, heads, absent", [
    ("global", ("global",), {"layer4_local", "layer4_channel", "layer4_spatial", "cam3", "sam3", "head_p0"}),
    ("local", ("p0", "p1", "p2", "global"), {"layer4_channel", "layer4_spatial", "cam3", "sam3"}),
    ("cam", ("p0", "p1", "p2", "global", "channel"), {"layer4_spatial", "sam3", "sam4", "head_spatial"}),
    ("laga", ("p0", "p1", "p2", "global", "spatial", "channel"), set()),
])
def test_ablation_presets(row, heads, absent):
  """Table III rows (configs/ablation.py): 1, 4, 5 and 6 heads; a disabled branch has no parameters."""
  config = ablation.get_config(row).model
  config.update(stage_sizes=(1, 1, 1, 1), width=8, reduction_dim=16)
  model = laga_net.from_config(config, NUM_CLASSES)
  assert model.head_names == heads
  outputs, variables = abstract_init(model, TINY_IMAGE)
  assert outputs["logits"].shape == (len(heads), 2, NUM_CLASSES)
  names = set(variables["params"])
  assert not names & absent
  assert {f"head_{h}" for h in heads} == {n for n in names if n.startswith("head_")}
  flags = {k: config[k] for k in ("use_local", "use_cam", "use_sam_rpe")}
  expected = laga_params((1, 1, 1, 1), 8, 16, NUM_CLASSES, 6, **flags)
  assert laga_net.count_params(variables["params"]) == expected


def test_backbone_partition():
  """`backbone` and every `layer4*` are the pretrained ResNet; attention and heads are new."""
  model = laga_net.from_config(model_config(stage_sizes=(1, 1, 1, 1), width=8, reduction_dim=16), NUM_CLASSES)
  _, variables = abstract_init(model, TINY_IMAGE)
  pretrained = {n for n in variables["params"] if laga_net.is_backbone_path((n,))}
  assert pretrained == {"backbone", "layer4_global", "layer4_local", "layer4_spatial", "layer4_channel"}
  assert set(variables["params"]) - pretrained == {
      "cam3", "cam4", "sam3", "sam4", "head_p0", "head_p1", "head_p2", "head_global", "head_spatial",
      "head_channel"}


def test_from_config_errors():
  with pytest.raises(ValueError, match="depth=34"):
    laga_net.from_config(model_config(depth=34), NUM_CLASSES)
  with pytest.raises(ValueError, match="stage_sizes=\\(1, 1\\)"):
    laga_net.from_config(model_config(stage_sizes=(1, 1)), NUM_CLASSES)
  with pytest.raises(ValueError, match="config.model.dtype='float8'"):
    laga_net.from_config(model_config(dtype="float8"), NUM_CLASSES)
  with pytest.raises(ValueError, match="num_classes=0"):
    laga_net.from_config(model_config(), 0)
  assert laga_net.from_config(model_config(depth=101), NUM_CLASSES).stage_sizes == (3, 4, 23, 3)


# --- a tiny model, run --------------------------------------------------------------------------------------

CAPTURED = ("layer4_global", "layer4_local", "sam4", "cam4")


def tiny_config(**overrides):
  return model_config(stage_sizes=(1, 1, 1, 1), width=8, reduction_dim=16, **overrides)


@pytest.fixture(scope="module")
def tiny():
  """The tiny model, its variables (attention gammas set to 0.5 so that the attention is not a no-op)
  and a batch of 4 images."""
  model = laga_net.from_config(tiny_config(), NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4,) + TINY_IMAGE + (3,)), jnp.float32)
  init = jax.jit(lambda rng: model.init(rng, images[:1], train=False))
  variables = init.lower(jax.random.PRNGKey(0)).compile(compiler_options=FAST_COMPILE)(jax.random.PRNGKey(0))
  for name, tree in variables["params"].items():
    if name[:3] in ("cam", "sam"):
      variables["params"][name] = {**tree, "gamma": jnp.full((1,), 0.5)}
  return model, variables, images


def _eval_fn(model):
  capture = lambda module, method: module.name in CAPTURED and method == "__call__"  # noqa: E731
  return jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=capture))


@pytest.fixture(scope="module")
def eval_fn(tiny):
  return _eval_fn(tiny[0])


@pytest.fixture(scope="module")
def eval_result(tiny, eval_fn):
  _, variables, images = tiny
  outputs, state = eval_fn(variables, images)
  captured = {name: state["intermediates"][name]["__call__"][0] for name in CAPTURED}
  return jax.device_get(outputs), jax.device_get(captured)


@pytest.fixture(scope="module")
def train_fn(tiny):
  model = tiny[0]
  return jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": rng}))


def test_tiny_eval_outputs(tiny, eval_fn, eval_result):
  _, variables, images = tiny
  outputs, _ = eval_result
  assert outputs["logits"].shape == (6, 4, NUM_CLASSES)
  assert outputs["embeddings"].shape == (6, 4, 16)
  assert outputs["pooled"].shape == (6, 4, 256)
  for key, value in outputs.items():
    assert value.dtype == np.float32 and np.isfinite(value).all(), key
  again, _ = eval_fn(variables, images)
  for key in outputs:
    np.testing.assert_array_equal(again[key], outputs[key], err_msg=key)


def test_logits_are_the_classifier_of_the_embeddings(tiny, eval_result):
  """The returned embedding is the classifier's input (the CE / triplet feature)."""
  model, variables, _ = tiny
  outputs, _ = eval_result
  for i, name in enumerate(model.head_names):
    classifier = variables["params"][f"head_{name}"]["classifier"]
    expected = outputs["embeddings"][i] @ np.asarray(classifier["kernel"]) + np.asarray(classifier["bias"])
    np.testing.assert_allclose(outputs["logits"][i], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_pooled_branches_in_head_order(eval_result):
  """p0..p2 are the means of rows 0-1, 2-3, 4-5 of the local layer4 map; then GAP of global, spatial
  (after sam4) and channel (after cam4); eval_features concatenates them in that order."""
  outputs, captured = eval_result
  local = captured["layer4_local"]
  assert local.shape == (4, 6, 2, 256)
  expected = [local[:, 2 * i:2 * i + 2].mean(axis=(1, 2)) for i in range(3)]
  expected += [captured[name].mean(axis=(1, 2)) for name in ("layer4_global", "sam4", "cam4")]
  np.testing.assert_allclose(outputs["pooled"], np.stack(expected), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(laga_net.eval_features(outputs),
                                np.concatenate(list(outputs["pooled"]), axis=1))
  # Independent layer4 copies with different random init: the branches really differ.
  assert not np.allclose(captured["layer4_local"], captured["layer4_global"])


@pytest.mark.parametrize("height, num_stripes", [(24, 3), (21, 3), (7, 3), (5, 4), (6, 1)])
def test_stripe_pool_matches_adaptive_avg_pool(height, num_stripes):
  """torch AdaptiveAvgPool2d((n, 1)): stripe i covers rows floor(i H / n) .. ceil((i + 1) H / n) - 1."""
  x = np.random.default_rng(height).standard_normal((2, height, 3, 4)).astype(np.float32)
  expected = [x[:, (i * height) // num_stripes:-(-(i + 1) * height // num_stripes)].mean(axis=(1, 2))
              for i in range(num_stripes)]
  np.testing.assert_allclose(laga_net.stripe_pool(jnp.asarray(x), num_stripes), np.stack(expected),
                             rtol=1e-6, atol=1e-6)


def test_train_mode_updates_stats_and_uses_dropout(tiny, train_fn):
  _, variables, images = tiny
  out_a, state_a = train_fn(variables, images, jax.random.PRNGKey(1))
  out_b, _ = train_fn(variables, images, jax.random.PRNGKey(2))
  out_a2, _ = train_fn(variables, images, jax.random.PRNGKey(1))
  for value in out_a.values():
    assert np.isfinite(np.asarray(value)).all()
  np.testing.assert_array_equal(out_a["embeddings"], out_a2["embeddings"])
  assert not np.array_equal(out_a["embeddings"], out_b["embeddings"])
  zeros = float(np.mean(np.asarray(out_a["embeddings"]) == 0))
  assert 0.35 < zeros < 0.65, f"dropout(0.5) zeroed {zeros:.0%} of the embeddings"
  # Dropout acts after the pooled features: those depend on the batch statistics only.
  np.testing.assert_array_equal(out_a["pooled"], out_b["pooled"])
  old = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
  new = dict(jax.tree_util.tree_leaves_with_path(state_a["batch_stats"]))
  assert len(old) == len(new)
  for path, leaf in old:
    assert not np.allclose(np.asarray(new[path]), np.asarray(leaf)), jax.tree_util.keystr(path)


def test_head_matches_author_classblock(fixtures_dir):
  """One reduction head in eval mode against the author's ClassBlock (fixtures/README.md)."""
  fx = {k[len("classblock."):]: v for k, v in np.load(fixtures_dir / "laga_heads_losses.npz").items()
        if k.startswith("classblock.")}
  head = laga_net.ReductionHead(num_classes=5, reduction_dim=16)
  variables = {
      "params": {"reduction": {"kernel": fx["add_block.0.weight"].T, "bias": fx["add_block.0.bias"]},
                 "bn": {"scale": fx["add_block.1.weight"], "bias": fx["add_block.1.bias"]},
                 "classifier": {"kernel": fx["classifier.0.weight"].T, "bias": fx["classifier.0.bias"]}},
      "batch_stats": {"bn": {"mean": fx["add_block.1.running_mean"], "var": fx["add_block.1.running_var"]}}}
  with jax.default_matmul_precision("highest"):
    embedding, logits = head.apply(variables, fx["input"], train=False)
  np.testing.assert_allclose(embedding, fx["bottleneck_eval"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, fx["logits_eval"], rtol=1e-5, atol=1e-5)


def test_head_init(tiny):
  """Reduction kaiming-normal fan_out (std sqrt(2/16)); BN scale N(1, .02); classifier N(0, .001); bias 0."""
  head = tiny[1]["params"]["head_global"]
  kernel = np.asarray(head["reduction"]["kernel"])
  assert kernel.shape == (256, 16)
  assert abs(kernel.std() / np.sqrt(2 / 16) - 1) < 0.1
  scale = np.asarray(head["bn"]["scale"])
  assert abs(scale.mean() - 1) < 0.02 and 0.005 < scale.std() < 0.04
  assert np.abs(np.asarray(head["classifier"]["kernel"])).max() < 0.006
  for leaf in (head["reduction"]["bias"], head["bn"]["bias"], head["classifier"]["bias"]):
    np.testing.assert_array_equal(leaf, 0)


def test_bfloat16_forward(tiny, eval_result):
  """bf16 compute: float32 parameters (shared with the float32 model), float32 outputs close to float32."""
  _, variables, images = tiny
  model = laga_net.from_config(tiny_config(dtype="bfloat16"), NUM_CLASSES)
  _, abstract = abstract_init(model, TINY_IMAGE)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
  outputs, _ = _eval_fn(model)(variables, images)
  reference, _ = eval_result
  for key in ("pooled", "logits"):
    assert outputs[key].dtype == jnp.float32
    value = np.asarray(outputs[key])
    relative = np.linalg.norm(value - reference[key]) / np.linalg.norm(reference[key])
    assert relative < 0.05, f"{key}: bf16 differs from float32 by {relative:.3f} (relative L2)"
    assert relative > 0, f"{key}: bf16 output is bit-identical to float32; is bf16 used at all?"


# --- pretrained weights into every layer4 copy --------------------------------------------------------------

def tiny_state_dict() -> dict:
  rng = np.random.default_rng(3)
  shapes = weights.torchvision_resnet_shapes((1, 1, 1, 1), 8, num_classes=7)
  def draw(key, shape):
    if key.endswith("num_batches_tracked"):
      return np.zeros(shape, np.int64)
    value = rng.uniform(0.5, 1.5, shape) if key.endswith("running_var") else rng.standard_normal(shape)
    return value.astype(np.float32)

  return {key: draw(key, shape) for key, shape in shapes.items()}


def test_laga_net_variables_fills_every_layer4(tiny):
  _, variables, _ = tiny
  state_dict = tiny_state_dict()
  ported = laga_net.pretrained_variables(state_dict, variables)
  block = ported["params"]["layer4_spatial"]["block0"]
  np.testing.assert_array_equal(block["conv2"]["kernel"],
                                state_dict["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ported["batch_stats"]["layer4_local"]["block0"]["downsample_bn"]["var"],
                                state_dict["layer4.0.downsample.1.running_var"])
  np.testing.assert_array_equal(ported["params"]["backbone"]["conv1"]["kernel"],
                                state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ported["params"]["backbone"]["layer3"]["block0"]["bn1"]["scale"],
                                state_dict["layer3.0.bn1.weight"])
  for collection in ("params", "batch_stats"):
    copies = [ported[collection][f"layer4_{b}"] for b in ("global", "local", "spatial", "channel")]
    for copy in copies[1:]:
      jax.tree_util.tree_map(np.testing.assert_array_equal, copy, copies[0])
  for name in ("cam3", "sam3", "sam4", "head_p0", "head_channel"):  # new layers keep their init
    jax.tree_util.tree_map(np.testing.assert_array_equal, ported["params"][name], variables["params"][name])
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(ported)} == {jnp.dtype(jnp.float32)}


def test_laga_net_variables_shared_and_errors():
  model = laga_net.from_config(tiny_config(shared_layer4=True), NUM_CLASSES)
  _, variables = abstract_init(model, TINY_IMAGE)
  state_dict = tiny_state_dict()
  ported = laga_net.pretrained_variables(state_dict, variables)
  np.testing.assert_array_equal(ported["params"]["layer4"]["block0"]["conv3"]["kernel"][0, 0],
                                state_dict["layer4.0.conv3.weight"][:, :, 0, 0].T)
  del state_dict["layer4.0.bn2.bias"]
  with pytest.raises(weights.WeightsError,
                     match=r"r50\.pth: .*missing key\(s\): layer4\.0\.bn2\.bias \(shape \(64,\)\)"):
    laga_net.pretrained_variables(state_dict, variables, source="r50.pth")
  wide = weights.torchvision_resnet_shapes((1, 1, 1, 1), 16)
  with pytest.raises(weights.WeightsError,
                     match=r"conv1\.weight: file has \(16, 3, 7, 7\), model expects \(8, 3, 7, 7\)"):
    laga_net.pretrained_variables({k: np.zeros(s, np.float32) for k, s in wide.items()}, variables)
