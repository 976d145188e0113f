"""Layers shared by the backbone, the attention modules and the heads."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics, so that ported weights and running statistics match torch.

  Differences from `flax.linen.BatchNorm` (all deliberate):
  * the running variance is updated with the *unbiased* batch variance (n / (n - 1)), as torch does;
  * batch statistics are always computed in float32 with two passes (mean, then mean squared deviation),
    because SAM-RPE's pre-BN relative terms reach magnitudes of ~300 where E[x^2] - E[x]^2 loses digits;
  * with `axis_name` set (inside `pmap` / `shard_map`), mean and variance are averaged over that axis
    (synchronised BN) and n counts the images of every device.
  `momentum=0.9` here is torch's `momentum=0.1`.
  """

  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  axis_name: Optional[str] = None
  scale_init: Initializer = nn.initializers.ones
  bias_init: Initializer = nn.initializers.zeros
  use_bias: bool = True   # False: no shift parameter, a fixed zero bias (BoT's BNNeck, §3.5)

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = (self.param("bias", self.bias_init, (features,), jnp.float32) if self.use_bias
            else jnp.zeros((features,), jnp.float32))

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      n = 1
      for axis in reduce_axes:
        n *= x.shape[axis]
      mean = jnp.mean(xf, axis=reduce_axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        n = n * lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased

    # y = (x - mean) * s + b folded into one multiply-add in the compute dtype.
    mul = scale * lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    dtype = self.dtype or x.dtype
    return x.astype(dtype) * mul.astype(dtype) + add.astype(dtype)


def canonical_dtype(name: str) -> Dtype:
  """Map a config string ("float32", "bfloat16", "float16") to a jnp dtype, with a clear error."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"config.model.dtype={name!r}: expected one of {sorted(table)}")
  return table[name]
