"""torchvision ResNet-50 parity on the synthetic-weight fixture (fixtures/README.md) and the ResNet API."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laga_jax import weights, xla_options
from laga_jax.models import resnet

RESNET50_PARAMS = 25_557_032  # torchvision: sum(p.numel() for p in resnet50().parameters())


def nchw(a) -> np.ndarray:
  return np.asarray(a).transpose(0, 3, 1, 2)


def assert_close(actual, expected, name=""):
  """The fixture's suggested check: ~10x the float32-vs-float64 error of torch itself."""
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=name)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  return np.load(fixtures_dir / "torchvision_resnet50.npz")


@pytest.fixture(scope="module")
def state_dict(fixtures_dir):
  spec = importlib.util.spec_from_file_location("resnet50_weights", fixtures_dir / "resnet50_weights.py")
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  return recipe.make_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
  return weights.resnet_variables(state_dict, source="resnet50_weights.make_state_dict()")


@pytest.fixture(scope="module")
def outputs(fixture, variables):
  """Forward passes of ResNet50 with last stride 2 (torchvision) and 1 (LAGA-Net): one compile each."""
  x = fixture["input"].transpose(0, 2, 3, 1)
  result = {}
  for last_stride in (2, 1):
    model = resnet.ResNet50(last_stride=last_stride, num_classes=1000)
    with jax.default_matmul_precision("highest"):
      result[last_stride] = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  return result


def test_state_dict_recipe_matches_fixture(fixture, state_dict):
  assert list(state_dict) == [str(k) for k in fixture["state_dict_keys"]]
  sums = np.array([np.sum(v, dtype=np.float64) for v in state_dict.values()])
  np.testing.assert_allclose(sums, fixture["state_dict_sum"], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("key", ["stem", "layer2", "layer3", "layer4", "pooled", "logits"])
def test_matches_torchvision_last_stride_2(fixture, outputs, key):
  out = outputs[2][key]
  assert_close(nchw(out) if out.ndim == 4 else out, fixture[key], key)


def test_layer1_matches_torchvision(fixture, outputs):
  assert_close(nchw(outputs[2]["layer1"][:1]), fixture["layer1_img0"], "layer1_img0")


@pytest.mark.parametrize("key", ["layer4", "pooled", "logits"])
def test_matches_torchvision_last_stride_1(fixture, outputs, key):
  out = outputs[1][key]
  assert_close(nchw(out) if out.ndim == 4 else out, fixture[f"s1_{key}"], f"s1_{key}")


def test_last_stride_changes_only_layer4(outputs):
  for key in ("stem", "layer1", "layer2", "layer3"):
    np.testing.assert_array_equal(outputs[1][key], outputs[2][key], err_msg=key)
  assert outputs[2]["layer4"].shape == (2, 4, 2, 2048)
  assert outputs[1]["layer4"].shape == (2, 8, 4, 2048)


def test_stage_runs_on_its_own(fixture, outputs, variables):
  """`ResNetStage` alone: layer4's variables at stride 1 on layer3 give torchvision's last-stride-1 layer4."""
  stage = resnet.ResNetStage(num_blocks=3, features=512, strides=1)
  stage_vars = {c: variables[c]["layer4"] for c in ("params", "batch_stats")}
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v, x: stage.apply(v, x))(stage_vars, outputs[2]["layer3"])
  assert_close(nchw(out), fixture["s1_layer4"], "ResNetStage")


def test_param_count_and_torchvision_names():
  shapes = jax.eval_shape(resnet.ResNet50(num_classes=1000).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))
  params = shapes["params"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == RESNET50_PARAMS
  assert set(params) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
  assert set(params["layer3"]) == {f"block{i}" for i in range(6)}
  assert set(params["layer1"]["block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                             "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in params["layer1"]["block1"]
  assert params["layer2"]["block0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert set(shapes["batch_stats"]["bn1"]) == {"mean", "var"}


def test_trunk_only_and_bfloat16():
  """num_stages=3 is LAGA-Net's trunk; bf16 computes in bf16 while parameters stay float32."""
  model = resnet.ResNet(resnet.stage_sizes_for_depth(50), num_stages=3, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 96, 32, 3))
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x))
  assert "layer4" not in variables["params"] and "fc" not in variables["params"]
  assert set(out) == {"stem", "layer1", "layer2", "layer3", "pooled"}
  assert out["layer3"].shape == (2, 6, 2, 1024) and out["layer3"].dtype == jnp.bfloat16
  assert out["pooled"].dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_stage_sizes_for_depth():
  assert resnet.stage_sizes_for_depth(50) == (3, 4, 6, 3)
  assert resnet.stage_sizes_for_depth(101) == (3, 4, 23, 3)
  assert resnet.stage_sizes_for_depth(152) == (3, 8, 36, 3)
  with pytest.raises(ValueError, match=r"depth=18 .*expected one of \[50, 101, 152\]"):
    resnet.stage_sizes_for_depth(18)


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(stage_sizes=(1, 1, 1)), (1, 32, 32, 3), "expected 4 block counts"),
    (dict(last_stride=3), (1, 32, 32, 3), "last_stride=3"),
    (dict(num_stages=3, num_classes=10), (1, 32, 32, 3), "num_classes needs num_stages=4"),
    (dict(), (1, 32, 32, 1), r"NHWC RGB images .*\(1, 32, 32, 1\)"),
])
def test_bad_arguments_raise(kwargs, shape, match):
  model = resnet.ResNet(**{"stage_sizes": (1, 1, 1, 1), "width": 8, **kwargs})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))


@pytest.mark.parametrize("avx512", [False, True], ids=["gemm_gradient", "xla_gradient"])
@pytest.mark.parametrize("kernel_size, strides, padding, shape", [
    (3, 1, 1, (2, 7, 5, 24)), (3, 2, 1, (2, 8, 6, 8)), (7, 2, 3, (1, 12, 10, 3))])
def test_conv2d_gradients_equal_xla(monkeypatch, avx512, kernel_size, strides, padding, shape):
  """conv2d's CPU backward (GEMM weight gradients without AVX-512, XLA's own with it) equals XLA's autodiff."""
  monkeypatch.setattr(xla_options, "host_has_avx512", lambda: avx512)
  rng = np.random.default_rng(kernel_size + strides)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  kernel = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, shape[-1], 16), np.float32))
  y, vjp = jax.vjp(lambda x, k: resnet._conv(x, k, strides, padding), x, kernel)
  g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  dx_ref, dk_ref = vjp(g)
  with jax.default_matmul_precision("highest"):
    dk_gemm = resnet._kernel_grad_gemm(x, g, kernel.shape, strides, padding)
    dx, dk = jax.vjp(lambda x, k: resnet.conv2d(x, k, strides, padding), x, kernel)[1](g)
  scale = np.abs(dk_ref).max()
  np.testing.assert_allclose(dk_gemm, dk_ref, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())


def test_cpu_compiler_options_leave_convolutions_to_eigen():
  """On CPU the train step's options keep convolutions out of YNNPACK; other platforms get none."""
  assert xla_options.compiler_options("gpu") is None and xla_options.compiler_options("tpu") is None
  options = xla_options.compiler_options("cpu")
  if options is None:
    pytest.skip("this jaxlib does not know xla_cpu_experimental_ynn_fusion_type: XLA's defaults apply")
  x, kernel = jnp.ones((4, 16, 8, 64)), jnp.ones((3, 3, 64, 64))
  compiled = jax.jit(lambda x, k: resnet._conv(x, k, 1, 1), compiler_options=options).lower(x, kernel).compile()
  with_options = compiled.as_text()[compiled.as_text().index("ENTRY"):]
  assert "convolution" in with_options and "ynn_fusion" not in with_options


@pytest.mark.parametrize("channels", [(8, 24), (24, 8)], ids=["widening", "narrowing"])
def test_pointwise_gradients_equal_autodiff(channels):
  """pointwise's backward (on CPU the weight gradient written thinner-map-first) equals the einsum's autodiff."""
  cin, cout = channels
  rng = np.random.default_rng(cin)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, cin), np.float32))
  kernel = jnp.asarray(rng.standard_normal((cin, cout), np.float32))
  g = jnp.asarray(rng.standard_normal((2, 5, 3, cout), np.float32))
  with jax.default_matmul_precision("highest"):
    dx_ref, dk_ref = jax.vjp(lambda x, k: jnp.einsum("bhwc,cd->bhwd", x, k), x, kernel)[1](g)
    dx, dk = jax.jit(lambda x, k, g: jax.vjp(resnet.pointwise, x, k)[1](g))(x, kernel, g)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5 * np.abs(dk_ref).max())
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())


@pytest.mark.parametrize("channels", [(16, 64), (64, 16)], ids=["widening", "narrowing"])
def test_pointwise_weight_gradient_transposes_the_thinner_map(channels):
  """Compiled for CPU, a 1x1 convolution's weight gradient copies no (channels, positions) transpose of its
  wider map: only the thinner one is transposed for the matrix product (or none is)."""
  cin, cout = channels
  x, g = jnp.ones((4, 16, 8, cin)), jnp.ones((4, 16, 8, cout))
  wide = max(cin, cout)

  def weight_grad(x, k, g):
    return jax.vjp(lambda k: resnet.pointwise(x, k), k)[1](g * 0.5 + 1.0)[0]

  compiled = jax.jit(weight_grad, compiler_options=xla_options.compiler_options("cpu")).lower(
      x, jnp.ones((cin, cout)), g).compile().as_text()
  entry = compiled[compiled.index("ENTRY"):]
  transposed = re.findall(r"= f32\[(\d+),512\]\{1,0\} (?:fusion|copy|transpose)", entry)
  assert str(wide) not in transposed, transposed
