"""Training-step throughput: images/s, compile time and peak memory of the LAGA-Net step and of the backbone alone.

  python -m benchmarks.train_step --out benchmarks/results/train_step.json                  # CPU: 2 steps each
  python -m benchmarks.train_step --model backbone --compare-torch --repeats 3              # JAX vs PyTorch
  python -m benchmarks.train_step --dtype bfloat16 --devices all --steps 50 --warmup 5     # GPU

(a) "laga": the real step (`laga_jax.train.train_step`, eq. 8 loss, Adam with coupled L2, P x K = 5 x 4).
(b) "backbone": torchvision's ResNet50 with last stride 1 and a 751-way classifier, plain cross entropy,
the same optimiser, through the same step function (the ResNet's logits as one head, triplet weight 0).
`--compare-torch` times (b) in PyTorch too (torchvision resnet50, same changes, Adam with weight decay),
alternating JAX and torch runs so both see the same machine load. torch is optional: it is imported only
with that flag and is never a dependency of the project or its tests.
`benchmarks/compare_torch.py` compares the full LAGA-Net step and feature extraction too, against the PyTorch
LAGA-Net of `benchmarks/torch_reference/`.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import base  # noqa: E402
from laga_jax import optim, parallel  # noqa: E402
from laga_jax import train as train_lib  # noqa: E402
from laga_jax import models  # noqa: E402
from laga_jax.models.layers import canonical_dtype  # noqa: E402
from laga_jax.models.resnet import ResNet, stage_sizes_for_depth  # noqa: E402

NUM_CLASSES = 751          # Market-1501 training identities
STEPS_PER_EPOCH = 646      # floor(12,936 / 20): only sets the LR table, never the timing
# Dense peak TFLOP/s per device: (bfloat16, float32 as XLA runs it on GPU = TF32 tensor cores).
PEAK_TFLOPS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0)}


class BackboneAsHead(nn.Module):
  """ResNet50 (last stride 1) + fc, its outputs shaped as one LAGA head so `train.train_step` can run it."""

  num_classes: int
  last_stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    out = ResNet(stage_sizes_for_depth(50), last_stride=self.last_stride, num_classes=self.num_classes,
                 dtype=self.dtype, bn_axis_name=self.bn_axis_name, name="backbone")(x, train)
    pooled = out["pooled"].astype(jnp.float32)[None]
    return {"logits": out["logits"][None], "embeddings": pooled, "pooled": pooled}


def peak_memory_bytes(device: Any) -> Dict[str, Optional[int]]:
  """Peak device memory (accelerators) and this process's peak RSS so far (a running maximum)."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return {"device_peak_bytes": (stats or {}).get("peak_bytes_in_use"),
          "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def flops_of(compiled: Any) -> Optional[float]:
  """XLA's FLOP count of one call of a compiled executable (per device), when the backend reports it."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend / version implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def peak_tflops(device: Any, dtype: str, override: float) -> Optional[float]:
  if override > 0:
    return override
  kind = getattr(device, "device_kind", "")
  for name, (bf16, fp32) in PEAK_TFLOPS.items():
    if name in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


class JaxStep:
  """A compiled train step of one model with its own state and a fixed random batch on the devices."""

  def __init__(self, which: str, args: argparse.Namespace):
    config = base.get_config()
    config.model.dtype = args.dtype
    devices = jax.local_devices() if args.devices == "all" else jax.local_devices()[:1]
    self.device = devices[0]
    multi = len(devices) > 1
    axis = parallel.DATA_AXIS if multi else None
    if which == "laga":
      module = models.get_model(config.model.name)
      model = module.build(config.model, NUM_CLASSES, bn_axis_name=axis)
      init_model = module.build(config.model, NUM_CLASSES)
      loss_cfg = config.loss
    else:
      dtype = canonical_dtype(args.dtype)
      model = BackboneAsHead(NUM_CLASSES, dtype=dtype, bn_axis_name=axis)
      init_model = BackboneAsHead(NUM_CLASSES, dtype=dtype)
      loss_cfg = config.loss.copy_and_resolve_references()
      loss_cfg.ce.label_smoothing, loss_cfg.triplet.weight = 0.0, 0.0   # plain CE, as the torch reference
    if args.batch % len(devices):
      raise ValueError(f"--batch {args.batch} is not divisible by the {len(devices)} devices")
    rng = np.random.default_rng(0)
    host_batch = {"image": rng.standard_normal((args.batch, args.height, args.width, 3), np.float32),
                  "label": np.repeat(np.arange(args.batch // 4 + 1), 4)[:args.batch].astype(np.int32)}
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(0))
    dummy = jnp.zeros((1, args.height, args.width, 3), jnp.float32)
    variables = jax.jit(lambda r: init_model.init(r, dummy, train=False))(init_rng)
    if which != "laga":
      config.optim.param_groups = ((".*", 1.0),)   # one group: the whole ResNet
    tx = optim.make_optimizer(config.optim, STEPS_PER_EPOCH,
                              backbone_pattern=models.get_model("laga").BACKBONE_PATTERN)
    state = train_lib.create_train_state(model, tx, dict(variables), dropout_rng)
    if multi:
      dp = parallel.DataParallel("shard_map", devices)
      step = dp.compile(train_lib.make_train_step(loss_cfg))
      state, self.batch = dp.replicate(state), dp.shard_batch(host_batch)
    else:
      step = jax.jit(train_lib.make_train_step(loss_cfg, axis_name=None), donate_argnums=(0,))
      state, self.batch = jax.device_put(state, self.device), jax.device_put(host_batch, self.device)
    self.num_devices, self.images = len(devices), args.batch
    start = time.perf_counter()
    self.compiled = step.lower(state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = flops_of(self.compiled)
    memory = getattr(self.compiled, "memory_analysis", lambda: None)()
    self.temp_bytes = getattr(memory, "temp_size_in_bytes", None)
    self.state = state
    self.first_step_s = self.time_steps(1)   # first execution: allocation, thread pools, page faults

  def time_steps(self, steps: int) -> float:
    """Seconds for `steps` consecutive steps, waiting for the last one."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    if not bool(metrics["finite"]):
      raise FloatingPointError("the benchmarked step produced a non-finite loss")
    return time.perf_counter() - start


class TorchStep:
  """The backbone step in PyTorch: torchvision resnet50, last stride 1, fc -> 751, CE, Adam(weight_decay)."""

  def __init__(self, args: argparse.Namespace):
    import torch
    import torchvision
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    model.layer4[0].conv2.stride = (1, 1)
    model.layer4[0].downsample[0].stride = (1, 1)
    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    self.model = model.to(memory_format=memory_format).train()
    self.optimizer = torch.optim.Adam(model.parameters(), lr=8e-5, weight_decay=5e-4)
    self.images = args.batch
    self.inputs = torch.randn(args.batch, 3, args.height, args.width).to(memory_format=memory_format)
    self.labels = torch.arange(args.batch) // 4
    self.torch, self.version = torch, f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    self.threads = torch.get_num_threads()
    self.first_step_s = self.time_steps(1)

  def time_steps(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      loss = self.torch.nn.functional.cross_entropy(self.model(self.inputs), self.labels)
      loss.backward()
      self.optimizer.step()
    if not self.torch.isfinite(loss):
      raise FloatingPointError("the torch step produced a non-finite loss")
    return time.perf_counter() - start


def measure(runners: Dict[str, Any], args: argparse.Namespace) -> Dict[str, list]:
  """Per runner, images/s of `--steps` steps after `--warmup`, repeated `--repeats` times, interleaved."""
  if args.warmup:
    for runner in runners.values():
      runner.time_steps(args.warmup)
  rates = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, runner in runners.items():
      rates[name].append(args.steps * runner.images / runner.time_steps(args.steps))
      print(f"  {name}: {rates[name][-1]:.2f} images/s", flush=True)
  return rates


def main(argv: Optional[list] = None) -> None:
  on_cpu = jax.default_backend() == "cpu"
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="both", choices=("laga", "backbone", "both"))
  parser.add_argument("--batch", type=int, default=20, help="global batch, P x K (5 x 4)")
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--devices", default="1", choices=("1", "all"))
  # A full-size LAGA step takes ~27 s on a 2-core CPU, so the CPU defaults are tiny.
  parser.add_argument("--steps", type=int, default=2 if on_cpu else 50, help="timed steps per repeat")
  parser.add_argument("--warmup", type=int, default=0 if on_cpu else 5,
                      help="untimed steps after the first execution (which is never timed)")
  parser.add_argument("--repeats", type=int, default=1, help="interleaved timed runs per model (median kept)")
  parser.add_argument("--compare-torch", action="store_true", help="also time the backbone step in PyTorch")
  parser.add_argument("--torch-channels-last", action="store_true", help="torch in NHWC (channels_last)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: table)")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  args = parser.parse_args(argv)

  which = ("laga", "backbone") if args.model == "both" else (args.model,)
  load_before = os.getloadavg()
  runners, rows = {}, []
  for name in which:
    runners[name] = JaxStep(name, args)
    rows.append({"model": name, "framework": f"jax {jax.__version__}", "compile_s": runners[name].compile_s,
                 **peak_memory_bytes(runners[name].device)})
  torch_runner = None
  if args.compare_torch:
    try:
      torch_runner = TorchStep(args)
    except ImportError as error:
      print(f"--compare-torch: torch/torchvision not importable ({error}); skipping the comparison")
  if torch_runner is not None:
    runners["torch backbone"] = torch_runner
    rows.append({"model": "torch backbone", "framework": torch_runner.version, "compile_s": None,
                 "torch_threads": torch_runner.threads, "channels_last": args.torch_channels_last,
                 "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
  rates = measure(runners, args)

  device = jax.local_devices()[0]
  peak = peak_tflops(device, args.dtype, args.peak_tflops)
  for row in rows:
    runner = runners[row["model"]]
    rate = statistics.median(rates[row["model"]])
    row.update(images_per_second=rate, runs=rates[row["model"]], ms_per_step=1000 * args.batch / rate,
               first_step_s=runner.first_step_s, market_epoch_minutes=12936 / rate / 60)
    if isinstance(runner, JaxStep):
      row.update(flops_per_step=runner.flops, xla_temp_bytes=runner.temp_bytes, num_devices=runner.num_devices,
                 **({"device_peak_bytes": peak_memory_bytes(runner.device)["device_peak_bytes"]}
                    if device.platform != "cpu" else {}))
      if runner.flops:
        achieved = runner.flops * rate / args.batch * runner.num_devices   # cost_analysis is per device
        row["achieved_tflops"] = achieved / 1e12
        if peak:
          row["mfu"] = achieved / (peak * 1e12 * runner.num_devices)

  shape = f"{args.batch} x {args.height}x{args.width}, {args.dtype}, {args.devices} device(s)"
  print(f"train step, batch {shape}, {args.steps} steps x {args.repeats} repeats on {device.device_kind}")
  header = ("model", "images/s", "ms/step", "compile s", "1st step s", "GFLOP/step", "TFLOP/s", "MFU",
            "peak RSS GiB", "device peak GiB", "Market epoch min")
  print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  gib = lambda b: None if b is None else b / 2**30
  for r in rows:
    print(f"| {r['model']} | {r['images_per_second']:.2f} | {r['ms_per_step']:.0f} | {fmt(r['compile_s'], '.1f')} | "
          f"{r['first_step_s']:.1f} | {fmt(r.get('flops_per_step') and r['flops_per_step'] / 1e9, '.0f')} | "
          f"{fmt(r.get('achieved_tflops'), '.3f')} | {fmt(r.get('mfu'), '.1%')} | "
          f"{fmt(gib(r['process_peak_rss_bytes']), '.2f')} | {fmt(gib(r.get('device_peak_bytes')), '.2f')} | "
          f"{r['market_epoch_minutes']:.1f} |")
  torch_rate = torch_runner and statistics.median(rates["torch backbone"])
  ratio = None
  if torch_rate and "backbone" in rates:
    ratio = statistics.median(rates["backbone"]) / torch_rate
    print(f"backbone step, JAX / torch images/s: {ratio:.2f} (runs: JAX {rates['backbone']}, torch "
          f"{rates['torch backbone']})")
  load_after = os.getloadavg()
  print(f"load average before: {load_before[0]:.2f}, after: {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.out:
    report = {"args": vars(args), "results": rows, "jax_over_torch": ratio, "device": device.device_kind,
              "platform": device.platform, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "peak_tflops": peak, "load_average_before": load_before, "load_average_after": load_after}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
