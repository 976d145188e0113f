"""CAM and SAM-RPE against the author-code fixtures, brute-force NumPy references and their invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laga_jax.models import attention

SAM_FIXTURES = ("author_C64_H8_W8", "author_C64_H12_W12", "generalised_C64_H12_W4", "generalised_C64_H24_W8")
TOL = dict(rtol=1e-4, atol=1e-4)
BN_NAMES = {"query/bn": "query_conv.1", "key/bn": "key_conv.1", "value/bn": "value_conv.1",
            "rel_height_bn": "bnormr", "rel_width_bn": "bnormc"}


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.asarray(a).transpose(0, 2, 3, 1)


def assert_close_to_scale(actual, expected, err_msg=""):
  """rtol 1e-4 with atol 1e-4 * max|ref|: for pre-BN terms of magnitude ~300 (fixtures/README.md)."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                             err_msg=err_msg)


def _subtree(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


# --- CAM -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cam_apply():
  model = attention.CAM()
  return jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))


@pytest.mark.parametrize("name, suffix", [("C64_H12_W4", ""), ("C64_H12_W4", "_relu"), ("C64_H24_W8", "")])
def test_cam_matches_author_fixture(fixtures_dir, cam_apply, name, suffix):
  fx = np.load(fixtures_dir / f"laga_cam_{name}.npz")
  variables = attention.cam_variables_from_torch(fx)
  with jax.default_matmul_precision("highest"):
    out, state = cam_apply(variables, nhwc(fx["input" + suffix]))
  inter = state["intermediates"]
  np.testing.assert_allclose(out, nhwc(fx["output" + suffix]), **TOL)
  assert_close_to_scale(inter["energy"], fx["inter.energy" + suffix])
  np.testing.assert_allclose(inter["attention"], fx["inter.attention" + suffix], **TOL)


def test_cam_paper_energy_is_softmax_of_plus_energy():
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 16)).astype(np.float32) * 0.3
  gamma = 0.7
  out = attention.CAM(energy="paper").apply({"params": {"gamma": np.array([gamma], np.float32)}}, x)
  feats = x.reshape(2, 15, 16).astype(np.float64)
  energy = np.einsum("bnc,bnk->bck", feats, feats)
  weights = np.exp(energy - energy.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = x + gamma * np.einsum("bck,bnk->bnc", weights, feats).reshape(x.shape)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  author = attention.CAM(energy="author").apply({"params": {"gamma": np.array([gamma], np.float32)}}, x)
  assert not np.allclose(author, out, atol=1e-3)  # the two readings really differ on this input


def test_cam_initial_gamma_is_zero_and_identity():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 16))
  variables = jax.jit(attention.CAM().init)(jax.random.PRNGKey(1), x)
  assert jax.tree_util.tree_map(jnp.shape, variables["params"]) == {"gamma": (1,)}
  np.testing.assert_array_equal(jax.jit(attention.CAM().apply)(variables, x), x)


def test_cam_rejects_unknown_energy():
  with pytest.raises(ValueError, match=r"CAM.energy='plus' \(config.model.cam_energy\)"):
    jax.eval_shape(lambda: attention.CAM(energy="plus").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 8))))


# --- SAM-RPE against the author's module ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=SAM_FIXTURES)
def sam_run(request, fixtures_dir):
  """(fixture arrays, eval output, eval intermediates, train output, updated batch_stats) of one file."""
  fx = dict(np.load(fixtures_dir / f"laga_sam_rpe_{request.param}.npz"))
  variables = attention.sam_rpe_variables_from_torch(fx)
  model = attention.SAMRPE()
  x = nhwc(fx["input"])
  with jax.default_matmul_precision("highest"):
    out_eval, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
        variables, x)
    out_train, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x)
  return fx, out_eval, state["intermediates"], out_train, updated["batch_stats"]


def test_sam_rpe_eval_output(sam_run):
  fx, out_eval, *_ = sam_run
  np.testing.assert_allclose(out_eval, nhwc(fx["output_eval"]), **TOL)


def test_sam_rpe_intermediates(sam_run):
  fx, _, inter, *_ = sam_run
  for name in ("q", "k", "v"):
    np.testing.assert_allclose(inter[name], nhwc(fx[f"inter.{name}"]), **TOL, err_msg=name)
  if "inter.attention" in fx:
    np.testing.assert_allclose(inter["attention"], fx["inter.attention"], **TOL)
  assert_close_to_scale(inter["E_H"], nhwc(fx["inter.E_H_pre_bn"]), "E_H")
  assert_close_to_scale(inter["E_W"], nhwc(fx["inter.E_W_pre_bn"]), "E_W")


def test_sam_rpe_train_output_and_running_stats(sam_run):
  fx, _, _, out_train, stats = sam_run
  np.testing.assert_allclose(out_train, nhwc(fx["output_train"]), **TOL)
  for flax_name, torch_name in BN_NAMES.items():
    bn = _subtree(stats, flax_name)
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      ref = fx[f"train_updated.{torch_name}.{theirs}"]
      np.testing.assert_allclose(bn[ours], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(),
                                 err_msg=f"{flax_name}/{ours}")


def test_diagonal_index_and_positional_embedding(sam_run):
  fx, *_ = sam_run
  _, _, h, w = fx["input"].shape
  length = (fx["rel_rows"].shape[0] + 1) // 2
  index = attention.diagonal_rel_index(h, w, length)
  np.testing.assert_array_equal(index, fx["inter.rel_index"])
  np.testing.assert_array_equal(np.take(fx["rel_rows"], index, axis=0), fx["inter.P_H"])
  np.testing.assert_array_equal(np.take(fx["rel_columns"], index, axis=0), fx["inter.P_W"])


@pytest.mark.parametrize("order", attention.RELATIVE_ORDERS)
def test_both_associations_of_the_diagonal_term_match_fixture(sam_run, order):
  """E = V (P Q) from the fixture's own Q, V and R, by each association, equals the author's E."""
  fx, *_ = sam_run
  b, c, h, w = fx["inter.v"].shape
  flat = lambda t: nhwc(t).reshape(b, h * w, -1)
  index = attention.diagonal_rel_index(h, w, (fx["rel_rows"].shape[0] + 1) // 2)
  term = jax.jit(attention.diagonal_relative_term, static_argnames="order")
  with jax.default_matmul_precision("highest"):
    for rel, key in (("rel_rows", "E_H"), ("rel_columns", "E_W")):
      e = term(flat(fx["inter.q"]), flat(fx["inter.v"]), fx[rel], index, order=order)
      assert_close_to_scale(e, flat(fx[f"inter.{key}_pre_bn"]), key)


@pytest.mark.parametrize("h, w, c, expected", [(24, 8, 2048, "keys_first"), (24, 8, 1024, "values_first"),
                                                (21, 21, 2048, "values_first")])
def test_cheaper_association_is_chosen(h, w, c, expected):
  """Real LAGA sizes, traced only: values-first sums V per offset, an intermediate of shape (2L-1, B, C)."""
  n, length = h * w, max(h, w)
  args = [jax.ShapeDtypeStruct((2, n, c // 8), jnp.float32), jax.ShapeDtypeStruct((2, n, c), jnp.float32),
          jax.ShapeDtypeStruct((2 * length - 1, c // 8), jnp.float32)]
  index = attention.diagonal_rel_index(h, w, length)
  jaxpr = str(jax.make_jaxpr(lambda q, v, r: attention.diagonal_relative_term(q, v, r, index))(*args))
  assert (f"f32[{2 * length - 1},2,{c}]" in jaxpr) == (expected == "values_first")
  flops = attention.relative_term_flops(n, c, c // 8, 2 * length - 1)
  assert min(flops, key=flops.get) == expected


def test_axial_height_term_equals_author_einsum_variant(fixtures_dir):
  """The author's commented-out einsum variant computes the same E_H as rpe="axial" (its E_W differs)."""
  fx = np.load(fixtures_dir / "laga_sam_rpe_einsum_C64_H8_W8.npz")
  with jax.default_matmul_precision("highest"):
    _, state = attention.SAMRPE(rpe="axial").apply(
        attention.sam_rpe_variables_from_torch(fx), nhwc(fx["input"]), train=False, mutable=["intermediates"])
  assert_close_to_scale(state["intermediates"]["E_H"], nhwc(fx["inter.E_H_pre_bn"]))


# --- SAM-RPE against a brute-force NumPy reference (every rpe mode, non-square map) ------------------------

def _numpy_sam_rpe(x: np.ndarray, variables: dict, rpe: str) -> np.ndarray:
  """Eval-mode SAM-RPE in float64, relative terms summed key by key from their written definitions."""
  params, stats = variables["params"], variables["batch_stats"]
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  length = max(h, w)

  def bn(y, p, s):
    return (y - s["mean"]) / np.sqrt(np.asarray(s["var"], np.float64) + 1e-5) * p["scale"] + p["bias"]

  def embed(name):
    p = params[name]
    y = x @ np.asarray(p["conv"]["kernel"], np.float64)[0, 0] + p["conv"]["bias"]
    return np.maximum(bn(y, p["bn"], stats[name]["bn"]), 0.0).reshape(b, h * w, -1)

  q, k, v = embed("query"), embed("key"), embed("value")
  logits = np.einsum("bpd,bjd->bpj", q, k)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  out = np.einsum("bpj,bjc->bpc", att, v)
  if rpe != "none":
    rows, cols = np.divmod(np.arange(h * w), w)
    for rel_name, axis in (("rel_height", 0), ("rel_width", 1)):
      rel = np.asarray(params[rel_name], np.float64)
      term = np.zeros_like(out)
      for p in range(h * w):
        for a in range(h * w):
          if rpe == "diagonal":  # eq. (4)-(6): key a contributes through R[col(a) - row(a) + L - 1]
            offset = cols[a] - rows[a]
          elif axis == 0 and cols[a] == cols[p]:  # same column, row offset
            offset = rows[a] - rows[p]
          elif axis == 1 and rows[a] == rows[p]:  # same row, column offset
            offset = cols[a] - cols[p]
          else:
            continue
          term[:, p] += (q[:, p] @ rel[offset + length - 1])[:, None] * v[:, a]
      out = out + bn(term, params[f"{rel_name}_bn"], stats[f"{rel_name}_bn"])
  return x + params["gamma"][0] * out.reshape(x.shape)


def _randomised_variables(model, x, seed):
  """Initialised variables with gamma and the BN statistics moved off their trivial initial values."""
  init = jax.jit(lambda rng: model.init(rng, x, train=False))
  variables = jax.tree_util.tree_map(np.asarray, init(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  variables["params"]["gamma"] = np.array([0.6], np.float32)
  variables["batch_stats"] = jax.tree_util.tree_map(
      lambda s: (rng.uniform(0.5, 1.5, s.shape) if s.ndim and s[0] == 1 else rng.normal(0, 0.1, s.shape))
      .astype(np.float32), variables["batch_stats"])
  return variables


@pytest.mark.parametrize("rpe", attention.RPE_MODES)
def test_sam_rpe_matches_brute_force_reference(rpe):
  x = np.random.default_rng(1).standard_normal((2, 5, 3, 16)).astype(np.float32)
  model = attention.SAMRPE(rpe=rpe)
  variables = _randomised_variables(model, x, seed=2)
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(out, _numpy_sam_rpe(x, variables, rpe), rtol=1e-4, atol=1e-4)


# --- SAM-RPE structure, initialisation, options --------------------------------------------------------------

@pytest.mark.parametrize("rpe", attention.RPE_MODES)
def test_sam_rpe_init_is_identity_with_expected_parameters(rpe):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, 64))
  model = attention.SAMRPE(rpe=rpe)
  variables = jax.jit(lambda rng: model.init(rng, x, train=False))(jax.random.PRNGKey(1))
  shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
  expected = {"query", "key", "value", "gamma"}
  if rpe != "none":
    expected |= {"rel_height", "rel_width", "rel_height_bn", "rel_width_bn"}
    assert shapes["rel_height"] == shapes["rel_width"] == (11, 8)  # 2 max(H, W) - 1 rows, d_k = C / 8
  assert set(shapes) == expected
  assert set(variables["batch_stats"]) == expected - {"gamma", "rel_height", "rel_width"}
  assert shapes["query"]["conv"] == {"kernel": (1, 1, 64, 8), "bias": (8,)}
  assert shapes["value"]["conv"] == {"kernel": (1, 1, 64, 64), "bias": (64,)}
  # gamma = 0 at init: the module starts as the identity (eq. 7), in train and eval mode.
  apply = jax.jit(lambda v, train: model.apply(v, x, train=train, mutable=["batch_stats"]),
                  static_argnums=1)
  for train in (False, True):
    np.testing.assert_array_equal(apply(variables, train)[0], x)


def test_sam_rpe_default_initialisers_follow_pytorch():
  x = jnp.zeros((1, 8, 8, 256))
  params = jax.jit(lambda rng: attention.SAMRPE().init(rng, x, train=False))(jax.random.PRNGKey(3))["params"]
  bound = 1.0 / np.sqrt(256)  # kaiming_uniform(a=sqrt(5)) and the default bias: U(+-1/sqrt(fan_in))
  for name in ("query", "key", "value"):
    for leaf in params[name]["conv"].values():
      assert np.abs(leaf).max() <= bound
  for leaf in params["value"]["conv"].values():  # 256 and 65536 draws: the range is actually used
    assert np.abs(leaf).max() > 0.95 * bound
  kernel = np.asarray(params["value"]["conv"]["kernel"])
  assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform, not normal or truncated
  np.testing.assert_array_equal(params["value"]["bn"]["scale"], np.ones(256))
  np.testing.assert_array_equal(params["rel_width_bn"]["bias"], np.zeros(256))
  rel = np.asarray(params["rel_height"])  # N(0, 1), (2*8 - 1) x 32
  assert abs(rel.std() - 1.0) < 0.1 and abs(rel.mean()) < 0.1


def test_diagonal_rule_leaves_unused_offsets_without_gradient():
  """On a tall map (12x4) only offsets -11..3 occur, so rows 15..22 of R_H (of 23) get no gradient."""
  x = np.random.default_rng(4).standard_normal((2, 12, 4, 16)).astype(np.float32)
  model = attention.SAMRPE()
  variables = _randomised_variables(model, x, seed=5)

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  used = np.abs(np.asarray(grads["rel_height"])).sum(axis=1) > 0
  np.testing.assert_array_equal(used, np.arange(23) <= 3 - (-11))


def test_sam_rpe_bfloat16_stays_close_to_float32():
  x = np.random.default_rng(6).standard_normal((2, 6, 4, 32)).astype(np.float32)
  variables = _randomised_variables(attention.SAMRPE(), x, seed=7)
  ref = jax.jit(lambda v: attention.SAMRPE().apply(v, x, train=False))(variables)
  out = jax.jit(lambda v: attention.SAMRPE(dtype=jnp.bfloat16).apply(v, x.astype(jnp.bfloat16), train=False))(
      variables)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05 * np.abs(ref).max())
  cam = jax.jit(attention.CAM(dtype=jnp.bfloat16).apply)({"params": {"gamma": np.ones(1, np.float32)}}, x * 0.1)
  assert cam.dtype == jnp.bfloat16


def test_sam_rpe_rejects_wrong_rel_length_and_sizes():
  # Shape-only tracing: every check happens before any array is computed.
  def init(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))

  with pytest.raises(ValueError, match=r"rel_length=21 but the feature map is 24x8: .* max\(H, W\) = 24"):
    init(attention.SAMRPE(rel_length=21), (1, 24, 8, 16))
  variables = init(attention.SAMRPE(rel_length=24), (1, 24, 8, 16))
  with pytest.raises(ValueError, match=r"rel_height has 47 rows .* 2L - 1 = 23"):
    jax.eval_shape(lambda v: attention.SAMRPE().apply(v, jnp.zeros((1, 12, 4, 16)), train=False), variables)
  with pytest.raises(ValueError, match=r"SAMRPE.rpe='relative' \(config.model.rpe\)"):
    init(attention.SAMRPE(rpe="relative"), (1, 24, 8, 16))
  with pytest.raises(ValueError, match="at least 8 input channels"):
    init(attention.SAMRPE(), (1, 4, 4, 4))


def test_torch_converter_names_missing_keys(fixtures_dir):
  fx = dict(np.load(fixtures_dir / "laga_sam_rpe_author_C64_H8_W8.npz"))
  del fx["key_conv.1.running_var"]
  with pytest.raises(KeyError, match="key_conv.1.running_var"):
    attention.sam_rpe_variables_from_torch(fx)
