"""Profile: oneDNN's convolutions called from JAX (XLA FFI) against XLA:CPU's, per ResNet-50 shape and in the step.

  python -m venv onednnenv && onednnenv/bin/pip install onednn onednn-devel   # Intel's wheels (~2 GB with
                                                                                # their SYCL / TBB runtime)
  python -m benchmarks.profiles.onednn_conv --onednn-prefix onednnenv           # per shape
  python -m benchmarks.profiles.onednn_conv --onednn-prefix onednnenv --backbone-step --repeats 3

It builds `onednn_conv.cc` (g++, the headers of jaxlib and onednn-devel) into a temporary folder, registers
its three handlers for the CPU, and times, best of `--repeats`, the forward and the two gradients of each
3x3 / 7x7 convolution of ResNet-50 (batch 20, 384x128, last stride 1) as XLA compiles them with the train
step's options (`laga_jax.xla_options`: Eigen's convolutions) and as oneDNN runs them, with the relative
difference of their results. `--backbone-step` instead times the ResNet-50 train step of
`benchmarks.compare_torch` with every `resnet.conv2d` computed by oneDNN against the same step as is,
alternating, in one process. Not part of laga_jax, whose requirements stay as they are; measured figures
are in benchmarks/RESULTS.md.
"""

import argparse
import ctypes
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.profiles.conv_weight_grad import SHAPES
from laga_jax import xla_options
from laga_jax.models import resnet

HANDLERS = ("OnednnConvForward", "OnednnConvDataGradient", "OnednnConvKernelGradient")


def build_and_register(prefix: pathlib.Path) -> None:
  """Compile onednn_conv.cc against `prefix`/include and `prefix`/lib/libdnnl.so; register its handlers."""
  out = pathlib.Path(tempfile.mkdtemp(prefix="onednn_conv_")) / "libonednn_conv.so"
  source = pathlib.Path(__file__).with_suffix(".cc")
  subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
                  f"-I{prefix / 'include'}", str(source), f"-L{prefix / 'lib'}", "-ldnnl",
                  f"-Wl,-rpath,{prefix / 'lib'}", "-o", str(out)], check=True)
  library = ctypes.CDLL(str(out))
  for name in HANDLERS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")


def _call(name: str, shape, *operands, stride: int, pad: int) -> jax.Array:
  return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(shape, jnp.float32))(
      *operands, stride=np.int64(stride), pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
  """`resnet._conv` (NHWC x HWIO, symmetric padding) by oneDNN; its gradients by oneDNN too."""
  kh, kw, _, out = kernel.shape
  shape = (x.shape[0], (x.shape[1] + 2 * padding - kh) // strides + 1, (x.shape[2] + 2 * padding - kw) // strides + 1,
           out)
  return _call("OnednnConvForward", shape, x, kernel, stride=strides, pad=padding)


def _onednn_fwd(x, kernel, strides, padding):
  return onednn_conv(x, kernel, strides, padding), (x, kernel)


def _onednn_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  return (_call("OnednnConvDataGradient", x.shape, g, kernel, stride=strides, pad=padding),
          _call("OnednnConvKernelGradient", kernel.shape, x, g, stride=strides, pad=padding))


onednn_conv.defvjp(_onednn_fwd, _onednn_bwd)


def best_ms(compiled, *args, repeats: int) -> float:
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def per_shape(args) -> list:
  options = xla_options.compiler_options("cpu")
  rows = []
  print("| convolution | forward XLA / oneDNN ms | both gradients XLA / oneDNN ms | relative difference |\n"
        "| --- | ---: | ---: | ---: |")
  for name, h, w, cin, cout, k, stride in SHAPES:
    pad = k // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, h, w, cin), np.float32))
    kernel = jnp.asarray(0.05 * rng.standard_normal((k, k, cin, cout), np.float32))
    y_shape = jax.eval_shape(lambda x, kernel: resnet._conv(x, kernel, stride, pad), x, kernel).shape
    g = jnp.asarray(rng.standard_normal(y_shape, np.float32))
    row = {"convolution": name}
    for label, conv in (("xla", resnet._conv), ("onednn", onednn_conv)):
      forward = jax.jit(lambda x, kernel, conv=conv: conv(x, kernel, stride, pad), compiler_options=options)
      y = forward(x, kernel)
      grads = jax.jit(lambda x, kernel, g, conv=conv: jax.vjp(lambda a, b: conv(a, b, stride, pad), x, kernel)[1](g),
                      compiler_options=options)
      row[f"{label}_forward_ms"] = best_ms(forward, x, kernel, repeats=args.repeats)
      row[f"{label}_gradients_ms"] = best_ms(grads, x, kernel, g, repeats=args.repeats)
      row[f"{label}_out"] = (y, *grads(x, kernel, g))
    row["relative_difference"] = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(row.pop("onednn_out"), row.pop("xla_out")))
    print(f"| {name} | {row['xla_forward_ms']:.1f} / {row['onednn_forward_ms']:.1f} | "
          f"{row['xla_gradients_ms']:.1f} / {row['onednn_gradients_ms']:.1f} | {row['relative_difference']:.1e} |",
          flush=True)
    rows.append(row)
  return rows


def backbone_step(args) -> dict:
  import torch  # noqa: F401  (here, before compiling: the shared initial weights come from torch)
  from benchmarks.compare_torch import SIZES, JaxBackbone, TorchBackbone
  size = SIZES["full"]
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((size["batch"],) + tuple(size["image"]) + (3,)).astype(np.float32),
           "label": (np.arange(size["batch"]) // 4 % size["num_classes"]).astype(np.int32)}
  state_dict = TorchBackbone(size, batch).state_dict
  runners = {"xla": JaxBackbone(size, state_dict, batch)}
  original = resnet._conv
  resnet._conv = onednn_conv   # conv2d's forward and its XLA-gradient branch both call _conv
  try:
    runners["onednn"] = JaxBackbone(size, state_dict, batch)
  finally:
    resnet._conv = original
  seconds = {name: [] for name in runners}
  for runner in runners.values():
    runner.run(1)
  for repeat in range(args.repeats):
    for name, runner in runners.items():
      seconds[name].append(runner.run(1))
    print(f"  repeat {repeat}: XLA {seconds['xla'][-1]:.2f} s, oneDNN convolutions {seconds['onednn'][-1]:.2f} s",
          flush=True)
  result = {name: statistics.median(s) for name, s in seconds.items()}
  print(f"backbone train step, median: XLA {result['xla']:.2f} s, oneDNN convolutions {result['onednn']:.2f} s")
  return {"median_s": result, "runs_s": seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--onednn-prefix", required=True, type=pathlib.Path,
                      help="an environment with `pip install onednn onednn-devel` (its include/ and lib/)")
  parser.add_argument("--batch", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--backbone-step", action="store_true", help="time the ResNet-50 train step instead")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  args = parser.parse_args()
  prefix = args.onednn_prefix.resolve()
  lib = str(prefix / "lib")
  if lib not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
    # libdnnl's own dependencies (TBB, the SYCL runtime) are found through the loader's path only, which a
    # running process cannot change: start again with it. Intel's wheel runs CPU kernels through its OpenCL
    # CPU runtime, which its ICD loader finds through OCL_ICD_FILENAMES.
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [lib, os.environ.get("LD_LIBRARY_PATH")])),
               OCL_ICD_FILENAMES=str(prefix / "lib" / "libintelocl.so"))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.profiles.onednn_conv", *sys.argv[1:]], env)
  build_and_register(prefix)
  print(f"load average before: {os.getloadavg()}")
  result = backbone_step(args) if args.backbone_step else {"shapes": per_shape(args)}
  print(f"load average after: {os.getloadavg()}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(dict(result, batch=args.batch, repeats=args.repeats), indent=1))


if __name__ == "__main__":
  main()
