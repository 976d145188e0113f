"""The attention modules of LAGA-Net: CAM (paper eq. 1-2) and SAM-RPE (eq. 3-7). NHWC throughout.

Both follow the author's MBA-Net code where it differs from the paper (docs/fidelity.md):
CAM's softmax is of the *negated* energy, SAM-RPE normalises over keys, and the relative term uses the
diagonal offset col(a) - row(a) of each position. Other readings are options (`CAM.energy`, `SAMRPE.rpe`).

Intermediates (Q, K, V, attention maps, relative terms before their BN) are recorded with `sow` in the
"intermediates" collection; they cost nothing unless that collection is requested as mutable.
"""

import functools
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from laga_jax.models.layers import BatchNorm

Dtype = Any
CAM_ENERGIES = ("author", "paper")
RPE_MODES = ("diagonal", "axial", "none")

# PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Conv2d bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _record(module: nn.Module, name: str, value: jax.Array) -> None:
  """Keep the latest value of an intermediate (not a tuple of every call, as `sow` does by default)."""
  module.sow("intermediates", name, value, reduce_fn=lambda _, new: new)


class CAM(nn.Module):
  """Channel attention module, eq. (1)-(2): out = gamma * (A X) + x, A = softmax(-+ X X^T) over channels.

  No embeddings: keys, queries and values are the input itself (as in the author's code). `energy="author"`
  is the code's softmax(rowmax(E) - E), which equals softmax(-E); `energy="paper"` is eq. (1)'s softmax(+E).
  """

  energy: str = "author"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.energy not in CAM_ENERGIES:
      raise ValueError(f"CAM.energy={self.energy!r} (config.model.cam_energy): expected one of {CAM_ENERGIES}")
    if x.ndim != 4:
      raise ValueError(f"CAM expects an NHWC feature map (B, H, W, C); got shape {x.shape}")
    b, h, w, c = x.shape
    x = x.astype(self.dtype)
    feats = x.reshape(b, h * w, c)
    # Accumulate in float32 even for bf16 inputs: energies are sums over H*W products and feed a softmax.
    energy = jnp.einsum("bnc,bnk->bck", feats, feats, preferred_element_type=jnp.float32)
    # The author's rowmax(E) - E is softmax(-E) exactly (softmax is shift-invariant, and jax.nn.softmax
    # subtracts the row maximum of its own input for stability).
    logits = -energy if self.energy == "author" else energy
    attention = jax.nn.softmax(logits, axis=-1)
    _record(self, "energy", energy)
    _record(self, "attention", attention)
    attended = jnp.einsum("bck,bnk->bnc", attention.astype(self.dtype), feats).reshape(b, h, w, c)
    gamma = self.param("gamma", nn.initializers.zeros, (1,), jnp.float32)
    return x + gamma.astype(self.dtype) * attended


class PointwiseEmbedding(nn.Module):
  """W_Q / W_K / W_V of SAM-RPE: 1x1 conv (with bias) -> BatchNorm -> ReLU."""

  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (1, 1), use_bias=True, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=torch_conv_kernel_init, bias_init=torch_conv_bias_init(x.shape[-1]),
                name="conv")(x)
    x = BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                  name="bn")(x)
    return nn.relu(x)


def diagonal_rel_index(height: int, width: int, length: int) -> np.ndarray:
  """Row of R used by each position a = h*W + w under eq. (4) as the author indexes it: w - h + L - 1."""
  rows, cols = np.divmod(np.arange(height * width), width)
  return cols - rows + length - 1


def axial_rel_index(size: int, length: int) -> np.ndarray:
  """(query, key) -> row of R for the offset key - query along one axis: key - query + L - 1."""
  pos = np.arange(size)
  return pos[None, :] - pos[:, None] + length - 1


RELATIVE_ORDERS = ("keys_first", "values_first")


def relative_term_flops(num_positions: int, channels: int, d_k: int, num_offsets: int) -> Dict[str, int]:
  """Multiply-adds per image of the two associations of `diagonal_relative_term`."""
  n, c = num_positions, channels
  return {"keys_first": num_offsets * d_k * n + n * n * c,
          "values_first": n * c + num_offsets * c * d_k + n * c * d_k}


def diagonal_relative_term(q: jax.Array, v: jax.Array, rel: jax.Array, index: np.ndarray,
                           order: Optional[str] = None) -> jax.Array:
  """E = V (P Q) with P = I R, i.e. P[a] = R[index[a]] (eq. 5-6); q (B, N, d_k), v (B, N, C) -> (B, N, C).

  Two exact associations, neither forming I or P:
    "keys_first":   P Q = (R Q)[index] (gather rows), then V (P Q)          ~ (2L-1) d_k N + N^2 C
    "values_first": V I = V summed per offset (segment sum), then ((V I) R) Q  ~ (2L-1) C d_k + N C d_k
  `order=None` takes the cheaper for these static shapes (`relative_term_flops`): values-first roughly when
  N > C/8 (hands' 21x21 maps; body 24x8 maps at C = 1024), keys-first for body 24x8 maps at C = 2048.
  """
  n, c = v.shape[1], v.shape[2]
  if order is None:
    flops = relative_term_flops(n, c, q.shape[-1], rel.shape[0])
    order = min(RELATIVE_ORDERS, key=flops.__getitem__)
  # The gather by `index` is a product with a constant (N, 2L-1) one-hot matrix: XLA turns it into a
  # matmul, where a gather (and the scatter-add of its gradient) runs serially on CPUs.
  select = jax.nn.one_hot(index, rel.shape[0], dtype=v.dtype)  # (N, 2L-1)
  if order == "keys_first":
    position_logits = jnp.einsum("ar,brp->bap", select, jnp.einsum("rd,bpd->brp", rel, q))  # (B, N keys, N queries)
    return jnp.einsum("bap,bac->bpc", position_logits, v)
  if order == "values_first":
    value_by_offset = jnp.einsum("ar,bac->rbc", select, v)
    return jnp.einsum("bpd,bcd->bpc", q, jnp.einsum("rbc,rd->bcd", value_by_offset, rel))
  raise ValueError(f"order={order!r}: expected one of {RELATIVE_ORDERS} or None")


def axial_relative_terms(q: jax.Array, v: jax.Array, rel_height: jax.Array, rel_width: jax.Array,
                         length: int) -> Tuple[jax.Array, jax.Array]:
  """True row/column relative terms; q (B, H, W, d_k), v (B, H, W, C) -> E_H, E_W (B, H, W, C).

  For the query at (h, w):
    E_H[h, w, c] = sum_i <Q[h, w], R_H[i - h + L - 1]> V[i, w, c]   (keys in the same column, row offset)
    E_W[h, w, c] = sum_j <Q[h, w], R_W[j - w + L - 1]> V[h, j, c]   (keys in the same row, column offset)
  No softmax, like the diagonal terms. E_H equals the author's commented-out einsum variant; that variant's
  E_W pairs the column offset i - y with V[i, y] (keys in the query's *column*), which we read as a slip.
  """
  _, height, width, _ = q.shape
  rel_h = jnp.take(rel_height, axial_rel_index(height, length), axis=0)  # (H query rows, H key rows, d_k)
  rel_w = jnp.take(rel_width, axial_rel_index(width, length), axis=0)    # (W query cols, W key cols, d_k)
  e_h = jnp.einsum("bhwi,biwc->bhwc", jnp.einsum("bhwd,hid->bhwi", q, rel_h), v)
  e_w = jnp.einsum("bhwj,bhjc->bhwc", jnp.einsum("bhwd,wjd->bhwj", q, rel_w), v)
  return e_h, e_w


class SAMRPE(nn.Module):
  """Spatial attention with relative positional encodings, eq. (3)-(7).

  out = gamma * (V A^T + BN(E_H) + BN(E_W)) + x with A = softmax over keys of Q^T K; Q, K (d_k = C/8) and
  V (C) are `PointwiseEmbedding`s. `rpe` selects E_H, E_W: "diagonal" (author's code: position a uses
  R[col(a) - row(a) + L - 1], see `diagonal_relative_term`), "axial" (`axial_relative_terms`) or "none"
  (no relative terms, parameters or BNs). R_H, R_W have 2L - 1 rows, L = max(H, W).
  """

  rel_length: Optional[int] = None
  rpe: str = "diagonal"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  def _rel_param(self, name: str, length: int, d_k: int) -> jax.Array:
    rows = 2 * length - 1
    if self.has_variable("params", name):
      stored = self.get_variable("params", name).shape[0]
      if stored != rows:
        raise ValueError(f"SAMRPE.{name} has {stored} rows (L = {(stored + 1) // 2}) but this feature map "
                         f"needs 2L - 1 = {rows} (L = max(H, W) = {length}); the module was initialised "
                         "for a different input size")
    return self.param(name, nn.initializers.normal(stddev=1.0), (rows, d_k), jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.rpe not in RPE_MODES:
      raise ValueError(f"SAMRPE.rpe={self.rpe!r} (config.model.rpe): expected one of {RPE_MODES}")
    if x.ndim != 4:
      raise ValueError(f"SAMRPE expects an NHWC feature map (B, H, W, C); got shape {x.shape}")
    b, h, w, c = x.shape
    if c < 8:
      raise ValueError(f"SAMRPE needs at least 8 input channels (d_k = C // 8); got C = {c}")
    length = max(h, w)
    if self.rel_length is not None and self.rel_length != length:
      raise ValueError(f"SAMRPE.rel_length={self.rel_length} but the feature map is {h}x{w}: it must equal "
                       f"max(H, W) = {length} (or be None to use max(H, W))")
    d_k = c // 8
    x = x.astype(self.dtype)
    embed = functools.partial(PointwiseEmbedding, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    q = embed(d_k, name="query")(x, train)
    k = embed(d_k, name="key")(x, train)
    v = embed(c, name="value")(x, train)
    for name, value in (("q", q), ("k", k), ("v", v)):
      _record(self, name, value)

    q_flat, k_flat, v_flat = (t.reshape(b, h * w, t.shape[-1]) for t in (q, k, v))
    logits = jnp.einsum("bpd,bjd->bpj", q_flat, k_flat, preferred_element_type=jnp.float32)
    # Normalised over keys j for each query p (the author's code; eq. 3 read literally is over queries).
    attention = jax.nn.softmax(logits, axis=-1)
    _record(self, "attention", attention)
    out = jnp.einsum("bpj,bjc->bpc", attention.astype(self.dtype), v_flat).reshape(b, h, w, c)

    if self.rpe != "none":
      rel_height = self._rel_param("rel_height", length, d_k).astype(self.dtype)
      rel_width = self._rel_param("rel_width", length, d_k).astype(self.dtype)
      if self.rpe == "diagonal":
        index = diagonal_rel_index(h, w, length)
        e_h, e_w = (diagonal_relative_term(q_flat, v_flat, rel, index).reshape(b, h, w, c)
                    for rel in (rel_height, rel_width))
      else:
        e_h, e_w = axial_relative_terms(q, v, rel_height, rel_width, length)
      _record(self, "E_H", e_h)
      _record(self, "E_W", e_w)
      norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.bn_axis_name,
                               dtype=self.dtype)
      out = out + norm(name="rel_height_bn")(e_h) + norm(name="rel_width_bn")(e_w)

    gamma = self.param("gamma", nn.initializers.zeros, (1,), jnp.float32)
    return x + gamma.astype(self.dtype) * out


# --- PyTorch (author code) parameter names -> Flax variables ------------------------------------------------

def _bn_from_torch(sd: Mapping[str, Any], key: str) -> Tuple[dict, dict]:
  params = {"scale": sd[f"{key}.weight"], "bias": sd[f"{key}.bias"]}
  stats = {"mean": sd[f"{key}.running_mean"], "var": sd[f"{key}.running_var"]}
  return params, stats


def cam_variables_from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """The author's `CAM_module` state_dict (key `gamma`) -> CAM variables."""
  return {"params": {"gamma": np.asarray(state_dict[f"{prefix}gamma"], np.float32)}}


def sam_rpe_variables_from_torch(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """The author's `SAM_module` state_dict -> SAMRPE variables {"params", "batch_stats"}.

  query_conv.0/1 -> query/conv, query/bn (likewise key, value); rel_rows -> rel_height, rel_columns ->
  rel_width, bnormr -> rel_height_bn, bnormc -> rel_width_bn (absent for relative_pos=False); gamma.
  1x1 conv weights (O, I, 1, 1) become Flax kernels (1, 1, I, O).
  """
  sd = {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items() if k.startswith(prefix)}
  required = ["gamma"] + [f"{n}_conv.{i}.{p}" for n in ("query", "key", "value")
                          for i, p in ((0, "weight"), (0, "bias"), (1, "weight"), (1, "bias"),
                                       (1, "running_mean"), (1, "running_var"))]
  missing = [k for k in required if k not in sd]
  if missing:
    raise KeyError(f"SAM-RPE state_dict (prefix {prefix!r}) lacks {missing}")
  params: dict = {"gamma": sd["gamma"]}
  stats: dict = {}
  for name in ("query", "key", "value"):
    bn_params, bn_stats = _bn_from_torch(sd, f"{name}_conv.1")
    params[name] = {"conv": {"kernel": sd[f"{name}_conv.0.weight"].transpose(2, 3, 1, 0),
                             "bias": sd[f"{name}_conv.0.bias"]},
                    "bn": bn_params}
    stats[name] = {"bn": bn_stats}
  if "rel_rows" in sd:
    params["rel_height"], params["rel_width"] = sd["rel_rows"], sd["rel_columns"]
    for torch_name, flax_name in (("bnormr", "rel_height_bn"), ("bnormc", "rel_width_bn")):
      params[flax_name], stats[flax_name] = _bn_from_torch(sd, torch_name)
  return {"params": params, "batch_stats": stats}
