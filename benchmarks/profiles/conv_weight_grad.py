"""Profile: a convolution's weight gradient as XLA lowers it against `resnet.conv2d`'s GEMMs, per ResNet-50 shape.

  python -m benchmarks.profiles.conv_weight_grad            # batch 20 at 384x128, last stride 1

Each line: the forward convolution, XLA's weight gradient (a convolution whose window is the whole feature
map) and the GEMM form `conv2d` uses on CPUs without AVX-512 (`_kernel_grad_gemm`), alternating, best of
`--repeats`, with the relative difference of the two gradients. The programs are compiled with the train
step's options (`laga_jax.xla_options`); `--xla-defaults` compiles them with XLA's defaults instead.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from laga_jax import xla_options
from laga_jax.models import resnet

# (name, input H, W, in, out, kernel, stride) at 384x128 input and last stride 1.
SHAPES = (("stem 7x7/2", 384, 128, 3, 64, 7, 2), ("layer1 3x3", 96, 32, 64, 64, 3, 1),
          ("layer2 3x3/2", 96, 32, 128, 128, 3, 2), ("layer2 3x3", 48, 16, 128, 128, 3, 1),
          ("layer3 3x3/2", 48, 16, 256, 256, 3, 2), ("layer3 3x3", 24, 8, 256, 256, 3, 1),
          ("layer4 3x3", 24, 8, 512, 512, 3, 1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--xla-defaults", action="store_true", help="compile without laga_jax.xla_options")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  options = None if args.xla_defaults else xla_options.compiler_options(jax.devices()[0].platform)

  def jit(fn):
    return jax.jit(fn, compiler_options=options)

  print(f"{jax.devices()[0].platform}, AVX-512: {xla_options.host_has_avx512()}, options {options}, "
        f"load average {os.getloadavg()[0]:.2f}")
  print(f"{'conv':14s} {'forward ms':>10s} {'XLA grad ms':>11s} {'GEMM grad ms':>12s} {'speed-up':>8s} {'rel diff':>8s}")
  for name, h, w, cin, cout, k, stride in SHAPES:
    pad = k // 2
    x = jnp.asarray(rng.standard_normal((args.batch, h, w, cin), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout), np.float32) * 0.05)
    g = jnp.asarray(rng.standard_normal(resnet._conv(x, kernel, stride, pad).shape, np.float32))
    forward = jit(lambda x, kernel: resnet._conv(x, kernel, stride, pad))
    xla = jit(lambda x, kernel, g: jax.vjp(lambda k_: resnet._conv(x, k_, stride, pad), kernel)[1](g)[0])
    gemm = jit(lambda x, kernel, g: resnet._kernel_grad_gemm(x, g, kernel.shape, stride, pad))
    runs = {"forward": lambda: forward(x, kernel), "xla": lambda: xla(x, kernel, g),
            "gemm": lambda: gemm(x, kernel, g)}
    ref, got = np.asarray(runs["xla"]()), np.asarray(runs["gemm"]())
    jax.block_until_ready(runs["forward"]())
    best = {key: float("inf") for key in runs}
    for _ in range(args.repeats):
      for key, fn in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best[key] = min(best[key], time.perf_counter() - start)
    diff = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"{name:14s} {best['forward'] * 1e3:10.1f} {best['xla'] * 1e3:11.1f} {best['gemm'] * 1e3:12.1f} "
          f"{best['xla'] / best['gemm']:7.2f}x {diff:8.1e}")


if __name__ == "__main__":
  main()
