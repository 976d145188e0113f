"""torchvision-compatible ResNet (Bottleneck "v1.5": the stride sits on the 3x3 conv). NHWC throughout.

Submodule names mirror torchvision's state_dict (`conv1`, `bn1`, `layer1`..`layer4` / `block{i}` /
`conv1..3`, `bn1..3`, `downsample_conv`, `downsample_bn`, `fc`) so that `laga_jax.weights` maps ImageNet
weights one to one. Padding is explicit and symmetric, as torch pads: "SAME" pads a stride-2 layer with an
even input by (0, 1) and would shift every feature map by half a pixel against the pretrained weights.
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from laga_jax import xla_options
from laga_jax.models.layers import BatchNorm

Dtype = Any

EXPANSION = 4  # Bottleneck output channels = 4 x its inner width
STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# torchvision's ResNet init: kaiming_normal_(mode="fan_out", nonlinearity="relu"); BN weight 1, bias 0.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)).
fc_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def stage_sizes_for_depth(depth: int) -> Tuple[int, ...]:
  """Bottleneck blocks per stage of a torchvision ResNet of this depth (50, 101 or 152)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth={depth} (config.model.depth) is not supported: expected one of "
                     f"{sorted(STAGE_SIZES)} (Bottleneck ResNets; 18/34 use BasicBlocks), or set "
                     "config.model.stage_sizes")
  return STAGE_SIZES[depth]


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution (optionally strided) computed as a matmul over channels.

  Same parameter (`kernel`, (1, 1, in, out)) as `nn.Conv`, so weights port unchanged. XLA:CPU runs the
  weight gradient of a 1x1 `lax.conv` as a convolution whose window is the whole feature map, ~5x slower
  than the equivalent einsum (benchmarks/profiles/conv1x1.py); on GPUs both lower to the same GEMM.
  """

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    if self.strides > 1:
      x = x[:, ::self.strides, ::self.strides, :]  # a padding-free 1x1 conv with stride s samples every s-th pixel
    return pointwise(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


@jax.custom_vjp
def pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[b,h,w,d] = sum_c x[b,h,w,c] W[c,d]: a 1x1 convolution; on CPU its weight gradient transposes the thinner map.

  For the weight gradient dW = sum over positions of x^T g, XLA:CPU copies one of the two maps into a
  (channels, positions) transpose first, fused with the BatchNorm backward that produces g. Which map it
  copies depends on how the product is written; written with the thinner map first, it copies that one: up
  to 4x fewer bytes (64 against 256 channels in a bottleneck; benchmarks/RESULTS.md). Other platforms keep
  the plain autodiff product.
  """
  return jnp.einsum("bhwc,cd->bhwd", x, kernel)


def _pointwise_fwd(x, kernel):
  return pointwise(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, g):
  x, kernel = residuals
  dx = jnp.einsum("bhwd,cd->bhwc", g, kernel)

  def autodiff(x, g):
    return jnp.einsum("bhwc,bhwd->cd", x, g)

  def thinner_first(x, g):
    if x.shape[-1] <= g.shape[-1]:
      return autodiff(x, g)
    return jnp.einsum("bhwd,bhwc->dc", g, x).T

  dkernel = lax.platform_dependent(x, g, cpu=thinner_first, default=autodiff)
  return dx, dkernel.astype(kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


_CONV_DIMS = ("NHWC", "HWIO", "NHWC")
# A weight gradient whose patch matrix has at most this many rows (kh * kw * in) is one GEMM over the stacked
# taps; a wider one is one GEMM per tap, which is as fast from ~1k rows on and skips the kh*kw-fold copy.
_STACKED_TAPS_MAX_ROWS = 1024


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (strides, strides), ((padding, padding), (padding, padding)),
                                  dimension_numbers=_CONV_DIMS)


def _kernel_grad_gemm(x: jax.Array, g: jax.Array, kernel_shape: Tuple[int, ...], strides: int,
                      padding: int) -> jax.Array:
  """dL/dW[i, j] = sum_{b,h,w} x_pad[b, s*h + i, s*w + j, :]^T g[b, h, w, :]: the weight gradient as GEMMs."""
  kh, kw, cin, cout = kernel_shape
  batch, out_h, out_w, _ = g.shape
  # Channels first, once: every tap is then a (cin, b*h*w) matrix whose contracted axes are its minor ones,
  # the operand layout XLA:CPU's GEMM takes without a transpose per tap.
  x = jnp.transpose(jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))), (3, 0, 1, 2))
  taps = [lax.slice(x, (0, 0, i, j), (cin, batch, i + strides * (out_h - 1) + 1, j + strides * (out_w - 1) + 1),
                    (1, 1, strides, strides)) for i in range(kh) for j in range(kw)]
  contract = (((1, 2, 3), (0, 1, 2)), ((), ()))
  if kh * kw * cin <= _STACKED_TAPS_MAX_ROWS:
    grad = lax.dot_general(jnp.concatenate(taps, axis=0), g, contract)
  else:
    grad = jnp.stack([lax.dot_general(tap, g, contract) for tap in taps])
  return grad.reshape(kernel_shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
  """A bias-free NHWC convolution, symmetric padding; on AVX2 CPUs its weight gradient is computed as GEMMs.

  Which weight gradient is faster on CPU depends on the CPU (benchmarks/profiles/conv_weight_grad.py). On an
  AVX2 EPYC, XLA's (a convolution whose window is the whole feature map) ran 3.6x slower than the same sums
  as matrix products for the 7x7 stem and up to 1.3x for ResNet-50's 3x3 convolutions. On an AVX-512 Xeon,
  with convolutions left to Eigen (`laga_jax.xla_options`), XLA's ran 1.6-6x faster than the GEMMs. So the
  GEMMs are used on CPUs without AVX-512 only. `lax.platform_dependent` keeps XLA's own gradient on GPU and
  TPU, where cuDNN and the TPU compiler have fast kernels for it; the forward pass is the plain convolution
  everywhere.
  """
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, g):
  x, kernel = residuals

  def xla_grads(x, kernel, g):
    return jax.vjp(lambda x, kernel: _conv(x, kernel, strides, padding), x, kernel)[1](g)

  def gemm_kernel_grad(x, kernel, g):
    dx = jax.vjp(lambda x: _conv(x, kernel, strides, padding), x)[1](g)[0]
    return dx, _kernel_grad_gemm(x, g, kernel.shape, strides, padding)

  cpu = xla_grads if xla_options.host_has_avx512() else gemm_kernel_grad
  return lax.platform_dependent(x, kernel, g, cpu=cpu, default=xla_grads)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class SpatialConv(nn.Module):
  """A bias-free k x k convolution with `nn.Conv`'s parameter (`kernel`, (k, k, in, out)) and `conv2d`'s gradient."""

  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features), jnp.float32)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (x4) with an identity or 1x1-conv shortcut; torchvision's `Bottleneck`."""

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(BatchNorm, use_running_average=not train, axis_name=self.bn_axis_name,
                             dtype=self.dtype)
    out_features = self.features * EXPANSION
    pointwise = functools.partial(PointwiseConv, dtype=self.dtype)
    y = nn.relu(norm(name="bn1")(pointwise(self.features, name="conv1")(x)))
    y = SpatialConv(self.features, 3, self.strides, padding=1, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(pointwise(out_features, name="conv3")(y))
    shortcut = x.astype(y.dtype)
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = pointwise(out_features, strides=self.strides, name="downsample_conv")(x)
      shortcut = norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One stage (`layer1`..`layer4`): `num_blocks` Bottlenecks, the first one strided."""

  num_blocks: int
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_blocks):
      x = Bottleneck(self.features, self.strides if i == 0 else 1, dtype=self.dtype,
                     bn_axis_name=self.bn_axis_name, name=f"block{i}")(x, train)
    return x


class ResNet(nn.Module):
  """torchvision ResNet; returns the stage outputs it computes, the global average pool and the logits.

  `num_stages=3` stops after layer3 (LAGA-Net's shared trunk); `last_stride=1` removes layer4's
  down-sampling (LAGA-Net); `num_classes=None` leaves out `fc`. Parameters are float32 whatever `dtype`
  (the compute dtype) is.
  """

  stage_sizes: Sequence[int]
  width: int = 64
  last_stride: int = 2
  num_classes: Optional[int] = None
  num_stages: int = 4
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  stem_relu: bool = True   # False: no ReLU between bn1 and the max-pool (BoT's reference code)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet.stage_sizes={tuple(self.stage_sizes)}: expected 4 block counts")
    if not 1 <= self.num_stages <= 4:
      raise ValueError(f"ResNet.num_stages={self.num_stages}: expected 1..4")
    if self.num_classes is not None and self.num_stages != 4:
      raise ValueError("ResNet.num_classes needs num_stages=4 (fc follows layer4)")
    if self.last_stride not in (1, 2):
      raise ValueError(f"ResNet.last_stride={self.last_stride} (config.model.last_stride): expected 1 or 2")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC RGB images (B, H, W, 3); got shape {x.shape}")

    x = SpatialConv(self.width, 7, strides=2, padding=3, dtype=self.dtype, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                  name="bn1")(x)
    # lax.reduce_window pads with the reduction's identity (-inf for max), as torch's MaxPool2d does.
    x = nn.max_pool(nn.relu(x) if self.stem_relu else x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outputs = {"stem": x}
    for i in range(self.num_stages):
      strides = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      x = ResNetStage(self.stage_sizes[i], self.width * 2**i, strides, dtype=self.dtype,
                      bn_axis_name=self.bn_axis_name, name=f"layer{i + 1}")(x, train)
      outputs[f"layer{i + 1}"] = x
    outputs["pooled"] = global_avg_pool(x)
    if self.num_classes is not None:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=fc_kernel_init, name="fc")(outputs["pooled"])
      outputs["logits"] = logits.astype(jnp.float32)
    return outputs


def global_avg_pool(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C) float32 mean over positions (torch's AdaptiveAvgPool2d(1) + flatten)."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


ResNet50 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[50])
ResNet101 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[101])
ResNet152 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[152])
