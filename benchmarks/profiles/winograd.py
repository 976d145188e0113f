"""Profile: Winograd F(4x4, 3x3) for the stride-1 3x3 convolutions against XLA:CPU's (Eigen), per shape and in the step.

  python -m benchmarks.profiles.winograd                                   # per ResNet-50 shape
  torchenv/bin/python -m benchmarks.profiles.winograd --step --repeats 3   # LAGA-Net step and features, A/B

Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016)
computes each 4x4 output tile of a 3x3 convolution from a 6x6 input tile as Aᵀ[(G W Gᵀ) ⊙ (Bᵀ d B)]A: 36
products per tile and channel pair instead of 144, as 36 batched GEMMs over (tiles, in) x (in, out). The
backward is written out (the transposed transforms around the two gradient GEMMs); differentiating the
forward's strided slices and stacks instead ran slower than Eigen's gradients.

The per-shape table times, best of `--repeats`, the forward and forward + both gradients of the stride-1 3x3
convolutions of ResNet-50 at batch 20, 384x128 (last stride 1), as `resnet.conv2d` compiles them with the
train step's options (`laga_jax.xla_options`) and as F(4x4, 3x3), with the relative error against
`resnet.conv2d`. `--step` builds `benchmarks.compare_torch`'s LAGA-Net train step and flip-averaged features
twice, as they are and with F(4x4, 3x3) for the stride-1 3x3 convolutions of at least `--min-channels`
inputs, and times them alternately in one process (it needs torch, for the reference's initial weights).
Not part of laga_jax; the measured figures and why it was not kept are in benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.profiles.onednn_conv import best_ms
from laga_jax import xla_options
from laga_jax.models import resnet

M, R = 4, 3            # output tile, filter size
A = M + R - 1          # input tile
# F(4x4, 3x3) with the interpolation points 0, ±1, ±2 and infinity (Lavin & Gray, eq. 7-8 generalised).
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float32)
# The kernel transform G W Gᵀ as one (36, 9) x (9, in * out) product: as an einsum it took 100 ms for a
# 512-channel kernel, as this product 13 ms.
KRON_G = np.kron(G, G)
SHAPES = {"layer1": (96, 32, 64), "layer2": (48, 16, 128), "layer3": (24, 8, 256), "layer4": (24, 8, 512)}


def _combine(parts, coefficients):
  """sum_i c_i parts[i] over the non-zero constants c_i."""
  total = None
  for c, part in zip(coefficients, parts):
    c = float(c)
    if c == 0:
      continue
    term = part if c == 1 else (-part if c == -1 else c * part)
    total = term if total is None else total + term
  return jnp.zeros_like(parts[0]) if total is None else total


def _taps(x, axis: int, count: int, tiles: int):
  """x[..., i::M][:tiles] along `axis` for i < count: the i-th row (or column) of every tile."""
  return [lax.slice_in_dim(x, i, i + M * (tiles - 1) + 1, M, axis=axis) for i in range(count)]


def _input_transform(xp, nh: int, nw: int):
  """(b, 4nh+2, 4nw+2, c) padded input -> (36, b*nh*nw, c): Bᵀ d B of every 6x6 tile."""
  rows = [_combine(_taps(xp, 1, A, nh), BT[k]) for k in range(A)]
  tiles = [_combine(_taps(row, 2, A, nw), BT[l]) for row in rows for l in range(A)]
  return jnp.stack(tiles).reshape(A * A, -1, xp.shape[-1])


def _input_transform_t(dv, b: int, nh: int, nw: int):
  """The transpose of `_input_transform`: (36, P, c) -> (b, 4nh+2, 4nw+2, c), overlapping tiles summed."""
  dv = dv.reshape(A, A, b, nh, nw, dv.shape[-1])

  def place(parts, axis: int, tiles: int):
    # parts[j] is offset j of every tile along `axis`: position M*t + j; offsets M, M+1 overlap the next tile.
    shape = list(parts[0].shape)
    shape[axis] = M * tiles
    head = jnp.stack(parts[:M], axis=axis + 1).reshape(shape)
    tail = jnp.stack(parts[M:] + [jnp.zeros_like(parts[0])] * (2 * M - A), axis=axis + 1).reshape(shape)
    zero = jnp.zeros((), head.dtype)
    pad_head, pad_tail = [(0, 0, 0)] * head.ndim, [(0, 0, 0)] * head.ndim
    pad_head[axis], pad_tail[axis] = (0, A - M, 0), (M, A - 2 * M, 0)
    return lax.pad(head, zero, pad_head) + lax.pad(tail, zero, pad_tail)

  columns = [place([_combine([dv[k, l] for l in range(A)], BT[:, j]) for j in range(A)], 2, nw) for k in range(A)]
  return place([_combine(columns, BT[:, i]) for i in range(A)], 1, nh)


def _output_transform(m, b: int, nh: int, nw: int):
  """(36, P, c) -> (b, 4nh, 4nw, c): Aᵀ m A of every tile, the tiles in place."""
  m = m.reshape(A, A, b, nh, nw, m.shape[-1])
  rows = [[_combine([m[k, l] for k in range(A)], AT[p]) for l in range(A)] for p in range(M)]
  y = jnp.stack([jnp.stack([_combine(rows[p], AT[q]) for q in range(M)], axis=3) for p in range(M)], axis=2)
  return y.reshape(b, nh * M, nw * M, y.shape[-1])


def _output_transform_t(g, nh: int, nw: int):
  """The transpose of `_output_transform`: (b, 4nh, 4nw, c) -> (36, P, c)."""
  rows = [_combine(_taps(g, 1, M, nh), AT[:, k]) for k in range(A)]
  tiles = [_combine(_taps(row, 2, M, nw), AT[:, l]) for row in rows for l in range(A)]
  return jnp.stack(tiles).reshape(A * A, -1, g.shape[-1])


def _transformed(x, kernel):
  b, h, w, _ = x.shape
  nh, nw = -(-h // M), -(-w // M)
  cin, cout = kernel.shape[2:]
  xp = jnp.pad(x, ((0, 0), (1, nh * M + 1 - h), (1, nw * M + 1 - w), (0, 0)))
  u = jnp.dot(KRON_G, kernel.reshape(R * R, cin * cout)).reshape(A * A, cin, cout)
  return _input_transform(xp, nh, nw), u, (b, h, w, nh, nw)


@jax.custom_vjp
def conv3x3(x, kernel):
  """A stride-1, padding-1 3x3 NHWC convolution by Winograd F(4x4, 3x3) (Lavin & Gray 2016, eq. 10)."""
  v, u, (b, h, w, nh, nw) = _transformed(x, kernel)
  y = _output_transform(lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))), b, nh, nw)
  return y[:, :h, :w]


def _conv3x3_fwd(x, kernel):
  return conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  v, u, (b, h, w, nh, nw) = _transformed(x, kernel)   # recomputed: the residuals stay those of a convolution
  dm = _output_transform_t(jnp.pad(g, ((0, 0), (0, nh * M - h), (0, nw * M - w), (0, 0))), nh, nw)
  dv = lax.dot_general(dm, u, (((2,), (2,)), ((0,), (0,))))
  du = lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))
  dkernel = jnp.dot(KRON_G.T, du.reshape(A * A, -1)).reshape(kernel.shape)
  return _input_transform_t(dv, b, nh, nw)[:, 1:1 + h, 1:1 + w], dkernel


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _rel(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def per_shape(batch: int, repeats: int) -> list:
  options = xla_options.compiler_options("cpu")
  rng = np.random.default_rng(0)
  rows = []
  for name, (h, w, c) in SHAPES.items():
    x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, c, c)) * np.sqrt(2 / (9 * c)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    row = {"shape": name, "input": [batch, h, w, c]}
    outputs = {}
    for label, conv in (("xla", lambda x, k: resnet.conv2d(x, k, 1, 1)), ("winograd", conv3x3)):
      forward = jax.jit(conv, compiler_options=options)
      grads = jax.jit(jax.grad(lambda x, k, g, conv=conv: jnp.vdot(conv(x, k), g), argnums=(0, 1)),
                      compiler_options=options)
      outputs[label] = (forward(x, kernel), *grads(x, kernel, cotangent))
      row[f"{label}_forward_ms"] = best_ms(forward, x, kernel, repeats=repeats)
      row[f"{label}_forward_and_gradients_ms"] = best_ms(grads, x, kernel, cotangent, repeats=repeats)
    row["relative_error"] = max(_rel(a, b) for a, b in zip(outputs["winograd"], outputs["xla"]))
    rows.append(row)
    print(f"| {name} {h}x{w}x{c} | {row['xla_forward_ms']:.1f} / {row['winograd_forward_ms']:.1f} | "
          f"{row['xla_forward_and_gradients_ms']:.1f} / {row['winograd_forward_and_gradients_ms']:.1f} | "
          f"{row['relative_error']:.1e} |", flush=True)
  return rows


def step_ab(repeats: int, min_channels: int) -> dict:
  from benchmarks import compare_torch
  spec, batch, images = compare_torch.inputs(compare_torch.SIZES["full"])
  state_dict = compare_torch.TorchLaga(spec, batch).state_dict
  plain = resnet.conv2d

  def winograd_where_wide(x, kernel, strides, padding):
    if kernel.shape[:2] == (3, 3) and strides == 1 and padding == 1 and x.shape[-1] >= min_channels:
      return conv3x3(x, kernel)
    return plain(x, kernel, strides, padding)

  runners = {}
  for label, conv in (("xla", plain), ("winograd", winograd_where_wide)):
    resnet.conv2d = conv     # read by SpatialConv when the step is traced (in the runners' constructors)
    try:
      laga = compare_torch.JaxLaga(spec, state_dict, batch)
      runners[label] = {"laga": laga, "features": compare_torch.JaxFeatures(laga, images)}
    finally:
      resnet.conv2d = plain
  for pair in runners.values():
    for runner in pair.values():
      runner.run(1)
  feature_error = _rel(jnp.asarray(runners["winograd"]["features"].out), jnp.asarray(runners["xla"]["features"].out))
  load = [os.getloadavg()[0]]
  seconds = {name: {label: [] for label in runners} for name in ("laga", "features")}
  for _ in range(repeats):
    for name in seconds:
      for label in runners:
        seconds[name][label].append(runners[label][name].run(1))
      print(f"  {name}: as is {seconds[name]['xla'][-1]:.2f} s, winograd {seconds[name]['winograd'][-1]:.2f} s",
            flush=True)
  load.append(os.getloadavg()[0])
  for name, runs in seconds.items():
    print(f"{name}: median {statistics.median(runs['xla']):.2f} s as is, {statistics.median(runs['winograd']):.2f} s "
          "with F(4x4, 3x3)")
  print(f"features: relative difference {feature_error:.1e}; load average {load[0]:.2f} -> {load[1]:.2f}")
  return {"seconds": seconds, "min_channels": min_channels, "feature_relative_difference": feature_error,
          "load_average": load}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--step", action="store_true", help="A/B of the LAGA-Net step and features (needs torch)")
  parser.add_argument("--min-channels", type=int, default=256, help="--step: F(4x4, 3x3) from this many inputs")
  parser.add_argument("--batch", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="", help="write the results as JSON here")
  args = parser.parse_args()
  if args.step:
    result = step_ab(args.repeats, args.min_channels)
  else:
    print("| 3x3 convolution | forward XLA / F(4x4) ms | forward + gradients XLA / F(4x4) ms | relative error |\n"
          "| --- | ---: | ---: | ---: |")
    result = {"shapes": per_shape(args.batch, args.repeats)}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(result, jax=jax.__version__, cpu=os.uname().machine), f, indent=2)


if __name__ == "__main__":
  main()
