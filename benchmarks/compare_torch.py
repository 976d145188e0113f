"""laga-jax against the PyTorch reference (benchmarks/torch_reference), alternately in one process, on CPU or GPU.

  python -m benchmarks.compare_torch --out benchmarks/results/compare_torch.json    # the paper's sizes
  python -m benchmarks.compare_torch --size tiny --out benchmarks/out/compare_tiny.json  # checks the script in ~2 min

Three comparisons, each as images/s of JAX divided by images/s of PyTorch (> 1: JAX is faster):
  backbone   train step of the ResNet alone (last stride 1, fc to the identities, plain CE, Adam with
             weight_decay): laga-jax's ResNet through `laga_jax.train.train_step` vs the reference ResNet
             (torchvision's resnet50 at full size).
  laga       the full LAGA-Net train step (eq. 8 loss, Adam with coupled L2 and the backbone group at 0.1x,
             dropout 0.5): the project's training path vs the reference model, loss and optimiser.
  features   flip-averaged, L2-normalised eval features (image + mirror, host copy included):
             `laga_jax.evaluation.features.flip_sum_normalise` vs the reference's eval forward.
Both frameworks start from the same weights (the reference's init, ported with the project's weight port).
The runs alternate JAX / PyTorch `--repeats` times, so both see the same machine load; the median is kept.
PyTorch flushes denormal floats to zero, as XLA:CPU always does (`--torch-denormals keep` turns that off):
SAM-RPE's softmax leaves attention weights below float32's normal range; on a Xeon their batched matmuls
took 43.6 s instead of 2.1 s, tripling the reference's train step, while JAX computed the same step with zeros.
Needs torch and the project's requirements in one environment (benchmarks/torch_reference/README.md).
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
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.torch_reference import jax_side  # noqa: E402
from benchmarks.torch_reference import spec as spec_lib  # noqa: E402

SIZES = {
    # The paper's body setting: ResNet-50, 751 identities (Market-1501), P x K = 5 x 4 at 384x128.
    "full": dict(stage_sizes=(3, 4, 6, 3), width=64, reduction_dim=1024, num_classes=751, image=(384, 128),
                 batch=20, feature_batch=20),
    # The parity test's network: one Bottleneck per stage, base width 16.
    "tiny": dict(stage_sizes=(1, 1, 1, 1), width=16, reduction_dim=64, num_classes=8, image=(128, 64),
                 batch=8, feature_batch=8),
}
TARGETS = {"backbone": 1.0, "laga": 1.0, "features": 1.5}   # issue targets for JAX / PyTorch


class ResNetAsHead(nn.Module):
  """laga-jax's ResNet (last stride 1) + fc, shaped as one head so `train.train_step` trains it with CE."""

  stage_sizes: Sequence[int]
  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    from laga_jax.models.resnet import ResNet
    out = ResNet(self.stage_sizes, self.width, last_stride=1, num_classes=self.num_classes,
                 name="backbone")(x, train)
    return {"logits": out["logits"][None], "pooled": out["pooled"][None]}


class Runner:
  """Something timed: `run(n)` returns the seconds of n calls, finished (results on the host)."""
  images: int

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.call()
    self.finish()
    return time.perf_counter() - start

  def call(self):
    raise NotImplementedError

  def finish(self):
    pass


# --- JAX ----------------------------------------------------------------------------------------------------

class JaxLaga(Runner):
  def __init__(self, spec, torch_state_dict, batch):
    self.training = jax_side.project_training(spec)
    dummy = jnp.zeros((1,) + tuple(spec.image) + (3,), jnp.float32)
    template = jax.eval_shape(lambda: self.training.model.init(jax.random.PRNGKey(0), dummy, train=False))
    self.variables = self.training.to_variables(torch_state_dict, template)
    self.state = jax.device_put(self.training.create_state(self.variables))
    self.batch, self.images = jax.device_put(batch), len(batch["label"])
    start = time.perf_counter()
    self.step = self.training.train_step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start

  def call(self):
    self.state, self.metrics = self.step(self.state, self.batch)

  def finish(self):
    jax.block_until_ready(self.state)
    if not np.isfinite(float(self.metrics["loss"])):
      raise FloatingPointError("JAX LAGA-Net step: non-finite loss")


class JaxFeatures(Runner):
  def __init__(self, laga: JaxLaga, images):
    self.variables = jax.device_put(laga.variables)
    self.fn = laga.training.features
    self.x, self.images = jax.device_put(images), len(images)
    start = time.perf_counter()
    self.compiled = self.fn.lower(self.variables, self.x).compile()
    self.compile_s = time.perf_counter() - start

  def call(self):
    self.out = np.asarray(self.compiled(self.variables, self.x))


class JaxBackbone(Runner):
  def __init__(self, size, torch_state_dict, batch):
    from configs import base
    from laga_jax import optim, weights, xla_options
    from laga_jax import train as train_lib
    config = base.get_config()
    config.loss.ce.label_smoothing, config.loss.triplet.weight = 0.0, 0.0    # plain CE
    config.optim.param_groups = ((".*", 1.0),)
    model = ResNetAsHead(size["stage_sizes"], size["width"], size["num_classes"])
    dummy = jnp.zeros((1,) + tuple(size["image"]) + (3,), jnp.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
    variables = weights.port_state_dict(
        torch_state_dict, {c: template[c] for c in ("params", "batch_stats")},
        lambda path, collection, leaf: weights.torch_key(path[1:], collection, leaf))
    tx = optim.make_optimizer(config.optim, 100)
    state = train_lib.create_train_state(model, tx, variables, jax.random.PRNGKey(0))
    self.state, self.batch, self.images = jax.device_put(state), jax.device_put(batch), len(batch["label"])
    step = jax.jit(train_lib.make_train_step(config.loss, axis_name=None), donate_argnums=(0,),
                   compiler_options=xla_options.compiler_options(jax.default_backend()))
    start = time.perf_counter()
    self.step = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start

  def call(self):
    self.state, self.metrics = self.step(self.state, self.batch)

  def finish(self):
    jax.block_until_ready(self.state)


# --- PyTorch ------------------------------------------------------------------------------------------------

class TorchLaga(Runner):
  def __init__(self, spec, batch):
    import torch
    from benchmarks.torch_reference import training
    self.torch, self.training, self.spec = torch, training, spec
    torch.manual_seed(0)
    self.model = training.build_model(spec).train()
    self.state_dict = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
    self.optimizer = training.make_optimizer(self.model, spec)
    training.set_epoch(self.optimizer, 0, spec)
    self.x = training.nchw(batch["image"])
    self.y = torch.from_numpy(batch["label"]).long()
    self.images = len(batch["label"])

  def call(self):
    self.optimizer.zero_grad(set_to_none=True)
    self.loss = self.training.laga_loss(self.model(self.x), self.y, self.spec)[0]
    self.loss.backward()
    self.optimizer.step()

  def finish(self):
    if not self.torch.isfinite(self.loss):
      raise FloatingPointError("torch LAGA-Net step: non-finite loss")


class TorchFeatures(Runner):
  def __init__(self, laga: TorchLaga, images):
    from benchmarks.torch_reference import model as model_lib
    self.torch, self.model_lib = laga.torch, model_lib
    self.model = laga.training.build_model(laga.spec)
    self.model.load_state_dict(laga.model.state_dict())
    self.model.eval()
    self.x, self.images = laga.training.nchw(images), len(images)

  def call(self):
    with self.torch.no_grad():
      self.out = self.model_lib.eval_features(self.model, self.x).numpy()


class TorchBackbone(Runner):
  def __init__(self, size, batch):
    import torch
    from benchmarks.torch_reference import model as model_lib
    self.torch = torch
    torch.manual_seed(0)
    self.model = model_lib.ResNet(size["stage_sizes"], size["width"], last_stride=1,
                                  num_classes=size["num_classes"]).train()
    self.state_dict = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=8e-5, weight_decay=5e-4)
    self.x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    self.y = torch.from_numpy(batch["label"]).long()
    self.images = len(batch["label"])

  def call(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    self.optimizer.step()


def cpu_model() -> str:
  """The CPU's model name and whether it has AVX-512, which picks the CPU kernels (the ratios differ by CPU)."""
  from laga_jax import xla_options
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    info = ""
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
              platform.processor() or platform.machine())
  return f"{name} ({'AVX-512' if xla_options.host_has_avx512() else 'no AVX-512'})"


def inputs(size: dict) -> tuple:
  """(the reference's Spec, a seeded train batch of P x K = batch/4 x 4, seeded eval images) of a SIZES entry."""
  spec = spec_lib.Spec(stage_sizes=size["stage_sizes"], width=size["width"], reduction_dim=size["reduction_dim"],
                       num_classes=size["num_classes"], image=size["image"], dropout=0.5,
                       p=size["batch"] // 4, k=4, steps=1)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((size["batch"],) + tuple(size["image"]) + (3,)).astype(np.float32),
           "label": (np.arange(size["batch"]) // 4 % size["num_classes"]).astype(np.int32)}
  eval_images = rng.standard_normal((size["feature_batch"],) + tuple(size["image"]) + (3,)).astype(np.float32)
  return spec, batch, eval_images


def main(argv: Optional[list] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="full", choices=tuple(SIZES), help="network and batch sizes")
  parser.add_argument("--only", default="backbone,laga,features", help="comma-separated comparisons to run")
  parser.add_argument("--steps", type=int, default=1, help="timed calls per run")
  parser.add_argument("--repeats", type=int, default=3, help="alternating JAX / torch runs (median kept)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each runner first")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--torch-denormals", default="flush", choices=("flush", "keep"),
                      help="flush: torch.set_flush_denormal(True), the arithmetic XLA:CPU uses (default)")
  parser.add_argument("--out", default="", help="write the results as JSON here (e.g. benchmarks/results/...)")
  args = parser.parse_args(argv)
  size = SIZES[args.size]
  which = [w for w in args.only.split(",") if w]
  unknown = set(which) - set(TARGETS)
  if unknown:
    parser.error(f"--only: unknown {sorted(unknown)}; expected some of {sorted(TARGETS)}")

  import torch
  torch.set_num_threads(args.torch_threads)
  if args.torch_denormals == "flush" and not torch.set_flush_denormal(True):
    print("this CPU cannot flush denormals in torch (no SSE3): they are kept", file=sys.stderr)
  spec, batch, eval_images = inputs(size)

  load_before = os.getloadavg()
  pairs: Dict[str, Dict[str, Any]] = {}
  if "laga" in which or "features" in which:
    torch_laga = TorchLaga(spec, batch)
    jax_laga = JaxLaga(spec, torch_laga.state_dict, batch)
    if "laga" in which:
      pairs["laga"] = {"jax": jax_laga, "torch": torch_laga}
    if "features" in which:
      # Features of the initial weights in both (before any step changes them).
      pairs["features"] = {"jax": JaxFeatures(jax_laga, eval_images), "torch": TorchFeatures(torch_laga, eval_images)}
  if "backbone" in which:
    torch_backbone = TorchBackbone(size, batch)
    pairs["backbone"] = {"jax": JaxBackbone(size, torch_backbone.state_dict, batch), "torch": torch_backbone}
  pairs = {k: pairs[k] for k in which}

  for pair in pairs.values():
    for runner in pair.values():
      runner.first_s = runner.run(1)          # first execution: allocation, thread pools
      if args.warmup:
        runner.run(args.warmup)
  if "features" in pairs:
    diff = spec_lib.rel_err(pairs["features"]["jax"].out, pairs["features"]["torch"].out)
    print(f"features of the same weights, JAX vs torch: relative error {diff:.1e}")
  rates = {name: {"jax": [], "torch": []} for name in pairs}
  for repeat in range(args.repeats):
    for name, pair in pairs.items():
      for framework, runner in pair.items():
        rates[name][framework].append(args.steps * runner.images / runner.run(args.steps))
      print(f"  repeat {repeat}: {name}: JAX {rates[name]['jax'][-1]:.3f}, torch {rates[name]['torch'][-1]:.3f} "
            "images/s", flush=True)
  load_after = os.getloadavg()

  device = jax.local_devices()[0]
  results = []
  print(f"\nJAX {jax.__version__} on {device.device_kind} vs torch {torch.__version__} "
        f"({args.torch_threads} threads, denormals {args.torch_denormals}); size {args.size}: {size}")
  print("| comparison | JAX images/s | torch images/s | JAX / torch | target | JAX compile s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: |")
  for name, pair in pairs.items():
    jax_rate, torch_rate = (statistics.median(rates[name][f]) for f in ("jax", "torch"))
    row = {"comparison": name, "jax_images_per_second": jax_rate, "torch_images_per_second": torch_rate,
           "jax_over_torch": jax_rate / torch_rate, "target": TARGETS[name], "runs": rates[name],
           "jax_compile_s": pair["jax"].compile_s, "jax_first_call_s": pair["jax"].first_s,
           "torch_first_call_s": pair["torch"].first_s, "images_per_call": pair["jax"].images}
    results.append(row)
    print(f"| {name} | {jax_rate:.3f} | {torch_rate:.3f} | {row['jax_over_torch']:.2f} | >= {TARGETS[name]} | "
          f"{row['jax_compile_s']:.1f} |")
  print(f"load average before: {load_before[0]:.2f}, after: {load_after[0]:.2f} ({os.cpu_count()} CPUs, "
        f"{cpu_model()}); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  report = {"args": vars(args), "size": {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()},
            "results": results, "device": device.device_kind, "platform": device.platform,
            "cpus": os.cpu_count(), "machine": cpu_model(), "torch_denormals": args.torch_denormals,
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_before": load_before,
            "load_average_after": load_after,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
