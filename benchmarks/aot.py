"""Compile the real train and eval steps for GPUs and TPUs this machine does not have (ahead of time, on CPU).

  python -m benchmarks.aot --config configs/market.py --targets h100,a100,v5e,v4 --out aot.json
  python -m benchmarks.aot --config configs/market.py --targets h100 --dtypes bfloat16 --layouts single
  python -m benchmarks.aot --list-targets

For every target, compute dtype and layout (one device; data-parallel over a multi-chip slice) it compiles

* the train step the trainer runs: `laga_jax.train.make_train_step(config.loss)` mapped by
  `laga_jax.parallel.DataParallel` (jit + shard_map, and pmap for the data-parallel layout) over the target's
  devices, the train state donated, the P x K batch split over the data axis;
* the eval feature step: `laga_jax.evaluation.features.flip_sum_normalise` (image + mirror, L2-normalised)
  at `config.eval.batch_size`, its batch split over the same devices;

and reports per device: compile time, FLOPs, memory (arguments, temporaries, outputs, aliased by donation,
and their sum as the peak), whether that fits the device, the largest P x K batch that fits (a bracketing
search on the batch: a linear guess from the measured memory, then bisection, at most `--bisect-steps`
extra compiles), and a roofline bound of images/s = devices x peak FLOP/s / FLOPs per image. That bound is an
upper bound from published peak numbers, never a measurement.

GPU targets are XLA `GpuTargetConfigProto` text files in benchmarks/aot_targets/ (sources in its README);
TPU targets are libtpu topologies. Nothing runs on a device: parameters stay abstract (`jax.eval_shape`).
Needs the `aot` extras (`pip install -e ".[aot]"`: libtpu and the CUDA PJRT plugin matching jax; see README).
"""

import argparse
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# Compile-only: nothing here needs (or should grab) a local accelerator. The CUDA plugin refuses to load
# without the CUDA runtime libraries unless its version check is skipped; compiling needs none of them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# libtpu takes a machine-wide lock file for the chips it drives; compiling drives none, so several compile
# runs (a benchmark and the test suite, say) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from laga_jax import parallel  # noqa: E402
from laga_jax.evaluation import features as features_lib  # noqa: E402

TARGET_DIR = pathlib.Path(__file__).resolve().parent / "aot_targets"
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
  """A device to compile for: its topologies, memory and published dense peak FLOP/s per compute dtype."""
  name: str
  platform: str                    # "cuda" or "tpu"
  description: str
  single: str                      # topology of the one-device layout
  data_parallel: str               # topology of the multi-device layout
  memory_bytes: int                # device memory (HBM) per device
  peak_tflops: Mapping[str, float]  # per device, dense, by compute dtype (see `PEAK_NOTE`)
  spec: str = ""                   # cuda: GpuTargetConfigProto text file in aot_targets/
  host_chips: Tuple[int, ...] = ()  # tpu: chips of one host (x, y, z); a smaller slice sits on one host
  tpu_options: Tuple[Tuple[str, Any], ...] = ()

  def spec_text(self) -> str:
    return (TARGET_DIR / self.spec).read_text()


def _spec_memory(spec: str) -> int:
  match = re.search(r"device_memory_size:\s*(\d+)", (TARGET_DIR / spec).read_text())
  return int(match.group(1)) if match else 0


# Dense peaks. float32 on GPU: XLA's default precision runs float32 dots and convolutions on TF32 tensor
# cores (Ampere and later), so the TF32 peak bounds it. float32 on TPU: the default precision is one
# bfloat16 pass on the MXU, so the bfloat16 peak bounds it. Sources: NVIDIA H100 Tensor Core GPU datasheet
# (SXM: 989 TFLOP/s bf16, 494 TFLOP/s TF32, dense); NVIDIA A100 datasheet (312 bf16, 156 TF32); Google Cloud
# TPU docs, "TPU v5e" (197 TFLOP/s bf16, 16 GiB HBM per chip) and "TPU v4" (275 TFLOP/s bf16, 32 GiB HBM
# per chip).
PEAK_NOTE = ("roofline bound = devices x peak FLOP/s / (FLOPs per image); dense peaks: H100 SXM 989 bf16 / "
             "494 TF32, A100 312 bf16 / 156 TF32 (float32 runs on TF32 under XLA's default precision), "
             "TPU v5e 197, v4 275 (bf16; float32 is one bf16 MXU pass by default). An upper bound, not a "
             "measurement.")

TARGETS: Dict[str, Target] = {t.name: t for t in (
    Target("h100", "cuda", "NVIDIA H100 SXM 80 GB", "1x1x1", "1x1x8", _spec_memory("h100_sxm.txtpb"),
           {"bfloat16": 989.0, "float32": 494.0}, spec="h100_sxm.txtpb"),
    Target("a100-40", "cuda", "NVIDIA A100 SXM4 40 GB", "1x1x1", "1x1x8", _spec_memory("a100_sxm_40.txtpb"),
           {"bfloat16": 312.0, "float32": 156.0}, spec="a100_sxm_40.txtpb"),
    Target("a100-80", "cuda", "NVIDIA A100 SXM4 80 GB", "1x1x1", "1x1x8", _spec_memory("a100_sxm_80.txtpb"),
           {"bfloat16": 312.0, "float32": 156.0}, spec="a100_sxm_80.txtpb"),
    # One host of 8 chips (v5litepod-8).
    Target("v5e", "tpu", "TPU v5e (v5 lite), 16 GiB HBM per chip", "v5e:1x1", "v5e:2x4", 16 * GIB,
           {"bfloat16": 197.0, "float32": 197.0}, host_chips=(2, 4, 1)),
    # Megacore: one JAX device per chip (both TensorCores), as JAX runs v4. 2x2x2 = 8 chips on 2 hosts.
    Target("v4", "tpu", "TPU v4 (megacore), 32 GiB HBM per chip", "v4:1x1x1", "v4:2x2x2", 32 * GIB,
           {"bfloat16": 275.0, "float32": 275.0}, host_chips=(2, 2, 1),
           tpu_options=(("chip_config_name", "megacore"),)),
)}
ALIASES = {"a100": ("a100-40", "a100-80")}
LAYOUTS = ("single", "dp")


def expand_targets(names: str) -> List[Target]:
  out = []
  for name in [n.strip() for n in names.split(",") if n.strip()]:
    for full in ALIASES.get(name, (name,)):
      if full not in TARGETS:
        raise SystemExit(f"--targets: unknown target {full!r}; known: {', '.join([*TARGETS, *ALIASES])}")
      out.append(TARGETS[full])
  return out


def extras_status() -> Dict[str, Optional[str]]:
  """Why a platform cannot compile here (None = it can): the `aot` extras and their version match."""
  from importlib import metadata

  def version(dist: str) -> Optional[str]:
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      return None

  jaxlib = version("jaxlib")
  status: Dict[str, Optional[str]] = {}
  status["tpu"] = None if importlib.util.find_spec("libtpu") else (
      "libtpu is not installed (pip install -e '.[aot]', see README 'Accelerators')")
  plugin = version("jax-cuda12-plugin")
  if plugin is None:
    status["cuda"] = "jax-cuda12-plugin is not installed (pip install -e '.[aot]', see README 'Accelerators')"
  elif plugin != jaxlib:
    status["cuda"] = f"jax-cuda12-plugin {plugin} does not match jaxlib {jaxlib}; install jax-cuda12-plugin=={jaxlib}"
  else:
    status["cuda"] = None
  return status


@functools.lru_cache(maxsize=None)
def target_devices(name: str, topology: str) -> tuple:
  """The compile-only devices of `topology` on target `name` (no hardware is touched)."""
  from jax.experimental import topologies
  target = TARGETS[name]
  if target.platform == "tpu":
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    dims += [1] * (3 - len(dims))
    # Chips per host: the host's block, or the whole slice when it is smaller (libtpu's default is 2x2x1).
    bounds = tuple(min(d, h) for d, h in zip(dims, target.host_chips))
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", chips_per_host_bounds=bounds,
                                        **dict(target.tpu_options))
  else:
    desc = topologies.get_topology_desc(platform="cuda", target_config=target.spec_text(), topology=topology)
  return tuple(desc.devices)


# ------------------------------------------------------------------------------------- the trainer adapter

@dataclasses.dataclass
class Program:
  """What the trainer would run, abstractly: the state's shapes and the per-device functions."""
  state: Any                      # abstract TrainState (jax.ShapeDtypeStruct leaves)
  train_step: Callable            # per-device step(state, batch) with collectives over parallel.DATA_AXIS
  feature_fn: Callable            # (variables, images) -> (B, D) un-normalised eval features
  eval_variables: Any             # abstract {"params", "batch_stats"} of the eval model
  model: str
  dtype: str = "float32"          # config.model.dtype (selects the peak FLOP/s of the roofline bound)


def build_program(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int) -> Program:
  """The model, train state and steps exactly as `laga_jax.trainer` builds them, without data or devices.

  This is the only function here that knows the trainer's API; change it when that API changes.
  """
  from laga_jax import train as train_lib
  from laga_jax import trainer
  module, model, eval_model = trainer.build_models(config, num_classes)
  feature_fn = trainer.eval_feature_fn(module, eval_model)
  known = dict(config=config, workdir=None, splits={}, num_classes=num_classes, model=model,
               eval_model=eval_model, data_parallel=None, steps_per_epoch=steps_per_epoch,
               total_steps=steps_per_epoch * config.train.num_epochs, feature_fn=feature_fn, model_module=module)
  fields = [f.name for f in dataclasses.fields(trainer.Experiment)]
  missing = [f for f in fields if f not in known]
  if missing:
    raise RuntimeError(f"benchmarks/aot.py build_program: trainer.Experiment has new fields {missing}; "
                       "update the adapter")
  exp = trainer.Experiment(**{f: known[f] for f in fields})
  # Shapes only: the full-size parameters and Adam moments are never materialised on the host.
  state = jax.eval_shape(lambda: trainer.create_state(exp))
  return Program(state=state, train_step=train_lib.make_train_step(config.loss), feature_fn=feature_fn,
                 eval_variables=state.variables(), model=config.model.name,
                 dtype=config.model.get("dtype", "float32"))


# --------------------------------------------------------------------------------------- configs, classes

# Training identities (= classifier width) and training images of each dataset's published split
# (data_pipelines/datasets/*: EXPECTED); images only set the LR table's steps per epoch.
TRAIN_SPLITS = {
    "market1501": (751, 12936), "dukemtmc": (702, 16522), "cuhk03_labeled": (767, 7368),
    "cuhk03_detected": (767, 7365), "msmt17": (1041, 30248), "11k_dorsal_right": (72, 962),
    "11k_dorsal_left": (73, 808), "11k_palmar_right": (72, 977), "11k_palmar_left": (76, 1004),
    "hd": (251, 2407), "demo": (40, 480),
}


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/x.py` or `configs/x.py:arg` (as run.py's --config), then `field.path=value` overrides."""
  import ast
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_absolute():
    file = (ROOT / file) if (ROOT / file).exists() else file.resolve()
  module_spec = importlib.util.spec_from_file_location(f"aot_config_{file.stem}", file)
  if module_spec is None or not file.exists():
    raise SystemExit(f"--config {spec}: no such config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  # Random init: AOT never reads weight files or checkpoints.
  with config.unlocked():
    for field in ("pretrained", "init_from"):
      if field in config.model:
        config.model[field] = ""
  return config


def with_dtype(config: ml_collections.ConfigDict, dtype: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if "dtype" not in config.model:
    if dtype != "float32":
      raise SystemExit(f"--dtypes {dtype}: model {config.model.name!r} has no config.model.dtype field")
    return config
  config.model.dtype = dtype
  return config


# -------------------------------------------------------------------------------------------- compiling

def _abstract(tree: Any, sharding: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, weak_type=s.weak_type), tree)


def _memory(compiled: Any) -> Optional[Dict[str, int]]:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return None
  out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "alias", "temp", "generated_code")}
  # What must be resident at once: inputs, outputs not written in place of a donated input, temporaries,
  # and the program itself.
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def _flops(compiled: Any, lowered: Any) -> Tuple[Optional[float], Optional[str]]:
  for source, stage in (("compiled", compiled), ("hlo-before-optimisation", lowered)):
    try:
      cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001
      continue
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    if flops and flops > 0:
      return float(flops), source
  return None, None


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|HbmOom")
_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


# Without a device, GEMM autotuning still compiles every candidate Triton tiling; it takes about a third of a
# GPU compile here and changes neither the HLO optimisations nor XLA's buffer assignment (the memory report
# of the demo model's step is identical without it). `--gpu-codegen fast` skips it: the kernels' tilings are
# then XLA's defaults and the compile time is not the real one.
FAST_GPU_CODEGEN = {"xla_gpu_autotune_level": 0}


def gpu_compiler_options(fast: bool) -> Dict[str, Any]:
  """CUDA compiler options: `fast` as above, and the jax < 0.12 workaround below."""
  options = dict(FAST_GPU_CODEGEN) if fast else {}
  # jaxlib 0.10 (the jax Python 3.11 resolves): XLA's Triton GEMM tiling aborts the whole process on the
  # LAGA-Net train step for sm_90 (`triton_tiling_propagation.cc: Check failed: subdim_size_accumulator ==
  # dim_size`); 0.12 compiles it. Without Triton GEMM fusions the GEMMs go to cuBLAS.
  if _version_tuple(jax.__version__) < (0, 12):
    options["xla_gpu_enable_triton_gemm"] = False
  return options


def _version_tuple(version: str) -> Tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def lower_step(devices: Sequence[Any], step: str, program: Program, image_size: Sequence[int], batch: int,
               mode: str = "shard_map") -> Any:
  """The step as the trainer runs it over `devices`, lowered for abstract (shape-only) arguments."""
  n = len(devices)
  h, w = image_size
  if step == "train":
    dp = parallel.DataParallel(mode, devices)
    fn = dp.compile(program.train_step)
    if mode == "pmap":  # pmap maps over a leading device axis; the state is broadcast (in_axes None)
      state = _abstract(program.state, None)
      images = jax.ShapeDtypeStruct((n, batch // n, h, w, 3), jnp.float32)
      labels = jax.ShapeDtypeStruct((n, batch // n), jnp.int32)
    else:
      state = _abstract(program.state, NamedSharding(dp.mesh, P()))
      rows = NamedSharding(dp.mesh, P(parallel.DATA_AXIS))
      images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32, sharding=rows)
      labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    return fn.lower(state, {"image": images, "label": labels})
  mesh = parallel.make_mesh(devices)
  variables = _abstract(program.eval_variables, NamedSharding(mesh, P()))
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32, sharding=NamedSharding(mesh, P(parallel.DATA_AXIS)))
  return features_lib.flip_sum_normalise.lower(program.feature_fn, variables, images)


def host_flops(step: str, program: Program, image_size: Sequence[int], per_device_batch: int) -> Optional[float]:
  """FLOPs of one device's share, from XLA's cost analysis of the same step lowered for one host CPU.

  The CUDA compiler reports no cost analysis for a compile-only target; the FLOPs of the unoptimised HLO of
  one device's work (the same per-device step, at the per-device batch) stand in for them.
  """
  try:
    lowered = lower_step(jax.devices("cpu")[:1], step, program, image_size, per_device_batch)
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001 - a missing count is reported as such
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def compile_step(target: Target, layout: str, step: str, program: Program, image_size: Sequence[int],
                 batch: int, mode: str = "shard_map", usable_fraction: float = 1.0,
                 fast_gpu_codegen: bool = False) -> Dict[str, Any]:
  """Compile one step for one target and layout; a JSON-able record (never raises on compile errors)."""
  topology = target.single if layout == "single" else target.data_parallel
  devices = list(target_devices(target.name, topology))
  n = len(devices)
  record: Dict[str, Any] = dict(target=target.name, platform=target.platform, layout=layout, topology=topology,
                                devices=n, step=step, parallel=mode if step == "train" else "jit",
                                batch=batch, per_device_batch=batch // n,
                                codegen="fast" if fast_gpu_codegen and target.platform == "cuda" else "full")
  if target.platform == "cuda":
    record["compiler_options"] = gpu_compiler_options(fast_gpu_codegen)
  start = time.perf_counter()
  try:
    if batch % n:
      raise ValueError(f"batch {batch} does not split over {n} devices")
    lowered = lower_step(devices, step, program, image_size, batch, mode)
    options = gpu_compiler_options(fast_gpu_codegen) if target.platform == "cuda" else None
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  except Exception as error:  # noqa: BLE001 - a failed compile is a result
    message = str(error)
    record["compile_s"] = round(time.perf_counter() - start, 1)
    record["oom"] = bool(_OOM.search(message))
    record["fits"] = False if record["oom"] else None
    record["error"] = message.strip().splitlines()[0][:400] if message.strip() else type(error).__name__
    required = _REQUIRED.search(message)
    if required:
      record["required_temp_bytes"] = int(float(required.group(1)) * _UNITS[required.group(2)])
    return record
  record["compile_s"] = round(time.perf_counter() - start, 1)
  record["memory"] = _memory(compiled)
  record["flops"], record["flops_source"] = _flops(compiled, lowered)
  if record["flops"] is None:
    record["flops"] = host_flops(step, program, image_size, batch // n)
    record["flops_source"] = "host-hlo-before-optimisation" if record["flops"] else None
  usable = int(target.memory_bytes * usable_fraction)
  record["fits"] = bool(record["memory"] and record["memory"]["peak"] <= usable)
  if record["flops"]:
    per_image = record["flops"] / max(batch // n, 1)
    dtype_peak = target.peak_tflops[program.dtype]
    record["gflop_per_image"] = round(per_image / 1e9, 2)
    record["roofline_images_per_s_bound"] = round(n * dtype_peak * 1e12 / per_image)
  return record


# ------------------------------------------------------------------------------------------- batch search

def search_max_batch(probe: Callable[[int], Dict[str, Any]], first: Dict[str, Any], unit: int,
                     limit: int, steps: int, cap: int = 8192) -> Dict[str, Any]:
  """Largest batch (a multiple of `unit`) whose step fits `limit` bytes per device, from `first`'s compile.

  Guesses the batch where the peak memory (linear in the batch) meets the limit, from the two nearest
  measured points (one point: its temporaries taken as all per-image, an under-estimate of the answer);
  then bisection inside the bracket. At most `steps` more compiles; returns the bracket found.
  """
  points = {first["batch"]: first}
  probes = [dict(batch=first["batch"], fits=first["fits"], peak=_peak(first), compile_s=first["compile_s"])]

  def bracket():
    ok = [b for b, r in points.items() if r["fits"]]
    bad = [b for b, r in points.items() if r["fits"] is False]
    return (max(ok) if ok else None), (min(bad) if bad else None)

  def guess(lo, hi):
    measured = sorted((b, _peak(r)) for b, r in points.items() if _peak(r))
    estimate = None
    if len(measured) >= 2:
      near = sorted(measured, key=lambda p: abs(p[1] - limit))[:2]
      (b1, m1), (b2, m2) = sorted(near)
      if b2 != b1 and m2 > m1:
        estimate = b1 + (limit - m1) * (b2 - b1) / (m2 - m1)
    elif measured:
      b1, m1 = measured[0]
      per_image = max(points[b1]["memory"]["temp"] or m1, 1) / b1
      estimate = b1 + (limit - m1) / per_image
    if estimate is None:  # nothing measured (e.g. a TPU out-of-memory compile): bisect, halve or double
      estimate = (lo + hi) / 2 if lo and hi else (hi / 2 if hi else 2 * (lo or unit))
    candidate = max(int(estimate // unit) * unit, unit)
    if lo is not None and candidate <= lo:
      candidate = lo + unit
    if hi is not None and candidate >= hi:
      candidate = ((lo or 0) + hi) // 2 // unit * unit
    return min(candidate, cap)

  for _ in range(steps):
    lo, hi = bracket()
    if lo is not None and hi is not None and hi - lo <= unit:
      break
    if hi is not None and hi <= unit:
      break
    if lo is not None and lo >= cap:
      break
    batch = guess(lo, hi)
    if batch in points or batch < unit:
      break
    record = probe(batch)
    points[batch] = record
    probes.append(dict(batch=batch, fits=record["fits"], peak=_peak(record), compile_s=record["compile_s"],
                       error=record.get("error")))
  lo, hi = bracket()
  return dict(max_batch=lo, first_failing=hi, exact=bool(lo and hi and hi - lo <= unit), unit=unit,
              probes=probes)


def _peak(record: Dict[str, Any]) -> Optional[int]:
  if record.get("memory"):
    return record["memory"]["peak"]
  return None


# ------------------------------------------------------------------------------------------------ report

def _gib(x: Optional[float]) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def format_table(rows: List[Dict[str, Any]], searches: Dict[tuple, Dict[str, Any]], k: int) -> str:
  head = ("| target | layout | dtype | step | batch (per dev) | compile s | GFLOP/img | args | temp | out | alias | "
          "peak/dev GiB | fits | max P×K (per dev) | bound img/s |")
  lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
  for r in rows:
    mem = r.get("memory") or {}
    search = searches.get((r["target"], r["layout"], r["dtype"], r["step"], r.get("parallel")))
    if search and search["max_batch"]:
      mb = search["max_batch"]
      best = f"{mb // k}×{k} = {mb} ({mb // r['devices']})" + ("" if search["exact"] else " ≥")
    elif search:
      best = "none"
    else:
      best = ""
    fits = {True: "yes", False: "NO", None: "error"}[r["fits"]]
    if r.get("error"):
      fits += f": {r['error'][:60]}"
    layout = f"{r['layout']} {r['topology']}" if r["platform"] == "tpu" else f"{r['layout']} {r['devices']}×"
    step = r["step"] + (f" ({r['parallel']})" if r["step"] == "train" else "")
    lines.append(
        f"| {r['target']} | {layout} | {r['dtype']} | {step} | {r['batch']} ({r['per_device_batch']}) | "
        f"{r['compile_s']} | {r.get('gflop_per_image', '-')} | {_gib(mem.get('argument'))} | "
        f"{_gib(mem.get('temp'))} | {_gib(mem.get('output'))} | {_gib(mem.get('alias'))} | "
        f"{_gib(mem.get('peak'))} | {fits} | {best} | {r.get('roofline_images_per_s_bound', '-')} |")
  return "\n".join(lines)


def tables_from(paths: Sequence[str]) -> List[str]:
  """The tables of several reports merged per config: every compile at a config's own batch (not the search
  probes), in target, layout, dtype, step order, with the batch searches' results."""
  if not paths:
    raise SystemExit("--tables-from: no report matches")
  order = {name: i for i, name in enumerate(TARGETS)}
  by_config: Dict[str, Dict[str, Any]] = {}
  for path in paths:
    report = json.loads(pathlib.Path(path).read_text())
    for config in report["configs"]:
      entry = by_config.setdefault(config["config"], dict(config=config, rows={}, searches={}))
      for r in report["results"]:  # a cell compiled again in a later report replaces the earlier one
        if r.get("config") == config["config"] and not r.get("probe"):
          entry["rows"][(r["target"], r["layout"], r["dtype"], r["step"], r.get("parallel"), r["batch"])] = r
      for search in report.get("max_batch", []):
        if search.get("config") == config["config"]:
          entry["searches"][(search["target"], search["layout"], search["dtype"], "train", "shard_map")] = search
  tables = []
  for spec, entry in by_config.items():
    c = entry["config"]
    rows = sorted(entry["rows"].values(), key=lambda r: (order.get(r["target"], 99), r["layout"] != "single", r["dtype"],
                                                r["step"], r.get("parallel") or ""))
    tables.append(f"{spec} ({c['num_classes']} classes, {c['image_size'][0]}×{c['image_size'][1]}, "
                  f"P×K = {c['p']}×{c['k']}):\n\n" + format_table(rows, entry["searches"], c["k"]))
  return tables


def versions() -> Dict[str, Optional[str]]:
  from importlib import metadata
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = None
  return out


# -------------------------------------------------------------------------------------------------- main

def round_up(x: int, unit: int) -> int:
  return -(-x // unit) * unit


def run(args: argparse.Namespace) -> Dict[str, Any]:
  """Compile everything asked for, cheapest-to-lose last: default-batch train steps of every target first,
  then eval steps, then pmap, then the batch searches. The report is rewritten after every compile."""
  targets = expand_targets(args.targets)
  status = extras_status()
  blocked = sorted({t.platform for t in targets if status[t.platform]})
  if blocked:
    raise SystemExit("cannot compile for " + ", ".join(blocked) + ": " +
                     "; ".join(status[p] for p in blocked))
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  modes = [m.strip() for m in args.parallel.split(",") if m.strip()]
  for name, values, allowed in (("--layouts", layouts, LAYOUTS), ("--steps", steps, ("train", "eval")),
                                ("--parallel", modes, parallel.PARALLEL_MODES),
                                ("--dtypes", dtypes, ("float32", "bfloat16"))):
    bad = [v for v in values if v not in allowed]
    if bad:
      raise SystemExit(f"{name}: unknown {bad}; expected some of {allowed}")
  argv = sys.argv[1:] if args.argv is None else args.argv
  report: Dict[str, Any] = dict(
      command="python -m benchmarks.aot " + " ".join(argv), versions=versions(),
      host=platform.processor() or platform.machine(), note=PEAK_NOTE, gpu_codegen=args.gpu_codegen,
      configs=[], results=[], max_batch=[], tables=[],
      targets={t.name: dict(dataclasses.asdict(t), memory_gib=round(t.memory_bytes / GIB, 2),
                            usable_fraction=args.gpu_memory_fraction if t.platform == "cuda" else 1.0)
               for t in targets})

  def save():
    if args.out:
      out = pathlib.Path(args.out)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(report, indent=1, default=str) + "\n")

  for config_spec in [c.strip() for c in args.config.split(",") if c.strip()]:
    base_config = load_config(config_spec, args.set)
    ids, images = TRAIN_SPLITS.get(base_config.data.name, (1000, 10000))
    num_classes = args.num_classes or ids
    p, k = base_config.data.p, base_config.data.k
    image_size = tuple(base_config.data.image_size)
    report["configs"].append(dict(config=config_spec, model=base_config.model.name, dataset=base_config.data.name,
                                  num_classes=num_classes, image_size=image_size, p=p, k=k,
                                  eval_batch=base_config.eval.batch_size, overrides=list(args.set)))
    programs = {}
    for dtype in dtypes:
      t0 = time.perf_counter()
      programs[dtype] = build_program(with_dtype(base_config, dtype), num_classes, max(images // (p * k), 1))
      print(f"[aot] {config_spec} {dtype}: abstract state built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: List[Dict[str, Any]] = []
    searches: Dict[tuple, Dict[str, Any]] = {}
    cells = [(dtype, target, layout) for target in targets for dtype in dtypes for layout in layouts]

    def compile_one(dtype, target, layout, step, batch, mode, probe=False):
      fraction = args.gpu_memory_fraction if target.platform == "cuda" else 1.0
      record = compile_step(target, layout, step, programs[dtype], image_size, batch, mode, fraction,
                            fast_gpu_codegen=args.gpu_codegen == "fast")
      record.update(config=config_spec, dtype=dtype, probe=probe)
      rows.append(record)
      report["results"].append(record)
      mem = record.get("memory") or {}
      print(f"[aot] {target.name:8s} {layout:6s} {dtype:8s} {step:5s} {record['parallel']:9s} "
            f"batch {batch:4d}: {record['compile_s']:7.1f} s, peak {_gib(mem.get('peak'))} GiB, fits "
            f"{record['fits']}" + (f", error {record['error'][:160]}" if record.get("error") else ""), flush=True)
      save()
      return record

    def geometry(target, layout):
      n = len(target_devices(target.name, target.single if layout == "single" else target.data_parallel))
      unit = math.lcm(k, n)
      return n, unit, round_up(p * k, unit)

    firsts = {}
    if "train" in steps and "shard_map" in modes:          # 1. the train step at the config's batch
      for dtype, target, layout in cells:
        n, unit, batch = geometry(target, layout)
        firsts[(dtype, target.name, layout)] = compile_one(dtype, target, layout, "train", batch, "shard_map")
    if "eval" in steps:                                    # 2. the eval feature step
      for dtype, target, layout in cells:
        n, _, _ = geometry(target, layout)
        compile_one(dtype, target, layout, "eval", round_up(base_config.eval.batch_size, n), "jit")
    if "train" in steps and "pmap" in modes:               # 3. the same train step under pmap
      for dtype, target, layout in cells:
        if layout == "dp":
          compile_one(dtype, target, layout, "train", geometry(target, layout)[2], "pmap")
    if "train" in steps and "shard_map" in modes and args.bisect_steps > 0:  # 4. the largest batch that fits
      for dtype, target, layout in cells:
        first = firsts[(dtype, target.name, layout)]
        if first["fits"] is None:
          continue
        n, unit, _ = geometry(target, layout)
        limit = int(target.memory_bytes * (args.gpu_memory_fraction if target.platform == "cuda" else 1.0))
        probe = functools.partial(lambda b, d, t, l: compile_one(d, t, l, "train", b, "shard_map", probe=True),
                                  d=dtype, t=target, l=layout)
        search = search_max_batch(probe, first, unit, limit, args.bisect_steps)
        search.update(config=config_spec, target=target.name, layout=layout, dtype=dtype, k=k, devices=n,
                      limit_bytes=limit, p_x_k=f"{search['max_batch'] // k}x{k}" if search["max_batch"] else None)
        searches[(target.name, layout, dtype, "train", "shard_map")] = search
        report["max_batch"].append(search)
        save()
    shown = [r for r in rows if not r.get("probe")]
    report["tables"].append(f"{config_spec} ({num_classes} classes, {image_size[0]}×{image_size[1]}, "
                            f"P×K = {p}×{k}):\n\n" + format_table(shown, searches, k))
    save()
  return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/market.py",
                      help="config file(s), comma-separated; `file.py:arg` as run.py (default configs/market.py)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set model.rpe=axial (repeatable)")
  parser.add_argument("--targets", default="h100,a100,v5e,v4",
                      help=f"comma-separated: {', '.join(TARGETS)} (a100 = both A100s)")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes (config.model.dtype)")
  parser.add_argument("--layouts", default="single,dp", help="single (one device) and/or dp (data-parallel)")
  parser.add_argument("--steps", default="train,eval", help="train and/or eval")
  parser.add_argument("--parallel", default="shard_map,pmap",
                      help="runners compiled for the train step (pmap: dp layout only; the default-batch compiles "
                           "and the batch search use shard_map, the trainer's default)")
  parser.add_argument("--bisect-steps", type=int, default=4,
                      help="extra train compiles per target/layout/dtype to find the largest batch (0: none)")
  parser.add_argument("--gpu-memory-fraction", type=float, default=0.75,
                      help="share of GPU memory a step may use (JAX preallocates 75%% by default; "
                           "XLA_PYTHON_CLIENT_MEM_FRACTION changes it). TPUs: the compiler's own HBM check")
  parser.add_argument("--gpu-codegen", choices=("full", "fast"), default="full",
                      help="fast: no GEMM autotuning (same HLO passes and memory report, about a third "
                           "quicker to compile here; the compile time is then not the real one)")
  parser.add_argument("--num-classes", type=int, default=0,
                      help="classifier width (default: the dataset's training identities)")
  parser.add_argument("--out", default="", help="write the JSON report here")
  parser.add_argument("--list-targets", action="store_true", help="print the targets and exit")
  parser.add_argument("--tables-from", default="", metavar="JSON[,JSON...]",
                      help="compile nothing: print one table per config from earlier reports (the runs of one "
                           "matrix split into several commands, e.g. benchmarks/results/aot_market*.json)")
  args = parser.parse_args(argv)
  args.argv = list(argv) if argv is not None else None
  return args


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = parse_args(argv)
  if args.list_targets:
    status = extras_status()
    for t in TARGETS.values():
      ready = status[t.platform] or "ready"
      print(f"{t.name:8s} {t.description:40s} single {t.single:9s} dp {t.data_parallel:9s} "
            f"{t.memory_bytes / GIB:6.2f} GiB  {ready}")
    return
  if args.tables_from:
    for table in tables_from(sorted(p for spec in args.tables_from.split(",") for p in glob.glob(spec.strip()))):
      print("\n" + table)
    print("\n" + PEAK_NOTE)
    return
  report = run(args)
  for table in report["tables"]:
    print("\n" + table)
  print("\n" + PEAK_NOTE)
  if args.out:
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
