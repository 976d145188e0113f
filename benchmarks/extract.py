"""Feature-extraction throughput of LAGA-Net: images/s of flip-averaged, L2-normalised 12,288-d features.

  python -m benchmarks.extract --out benchmarks/results/extract.json                  # CPU: 1 timed batch
  python -m benchmarks.extract --dtype bfloat16 --devices all --steps 50 --warmup 3  # GPU

Runs `laga_jax.evaluation.features.extract_features` (the evaluation path: host batch -> devices, model on
the image and its mirror, features back to the host) over random 384x128 batches of `--batch` images.
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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import base  # noqa: E402
from laga_jax import parallel  # noqa: E402
from laga_jax.evaluation import features as features_lib  # noqa: E402
from laga_jax import models  # noqa: E402

NUM_CLASSES = 751
MARKET_EVAL_IMAGES = 3368 + 15913   # query + gallery: one evaluation extracts them all


def main(argv: Optional[list] = None) -> None:
  on_cpu = jax.default_backend() == "cpu"
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=64, help="images per batch (config.eval.batch_size)")
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--devices", default="1", choices=("1", "all"))
  parser.add_argument("--steps", type=int, default=1 if on_cpu else 50, help="timed batches per repeat")
  parser.add_argument("--warmup", type=int, default=0 if on_cpu else 3,
                      help="untimed batches after the first (compiling) one")
  parser.add_argument("--repeats", type=int, default=1, help="timed runs (median kept)")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  args = parser.parse_args(argv)

  config = base.get_config()
  config.model.dtype = args.dtype
  module = models.get_model(config.model.name)
  model = module.build(config.model, NUM_CLASSES)
  devices = jax.local_devices() if args.devices == "all" else jax.local_devices()[:1]
  mesh = parallel.make_mesh(devices)
  dummy = jnp.zeros((1, args.height, args.width, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(jax.random.PRNGKey(0))
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

  def feature_fn(v, images):
    return module.eval_features(model.apply(v, images, train=False))

  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((args.batch, args.height, args.width, 3), np.float32),
           "mask": np.ones(args.batch, bool), "index": np.arange(args.batch)}

  def run(num_batches: int) -> float:
    """Seconds to extract `num_batches` batches (the features are back on the host when it returns)."""
    batches = [dict(batch, index=batch["index"] + i * args.batch) for i in range(num_batches)]
    start = time.perf_counter()
    feats = features_lib.extract_features(feature_fn, variables, batches, num_images=num_batches * args.batch,
                                          mesh=mesh)
    seconds = time.perf_counter() - start
    assert feats.shape == (num_batches * args.batch, len(model.head_names) * 2048) and np.isfinite(feats).all()
    return seconds

  load_before = os.getloadavg()
  first_s = run(1)   # compiles flip_sum_normalise for this shape, then runs one batch
  if args.warmup:
    run(args.warmup)
  rates = [args.steps * args.batch / run(args.steps) for _ in range(args.repeats)]
  rate = statistics.median(rates)
  device = devices[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  row = {"model": "laga", "dtype": args.dtype, "batch": args.batch, "num_devices": len(devices),
         "feature_dim": len(model.head_names) * 2048, "images_per_second": rate, "runs": rates,
         "ms_per_batch": 1000 * args.batch / rate, "first_batch_s_incl_compile": first_s,
         "market_eval_extraction_minutes": MARKET_EVAL_IMAGES / rate / 60,
         "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
         "device_peak_bytes": (stats or {}).get("peak_bytes_in_use")}
  header = ("model", "dtype", "batch", "devices", "images/s", "ms/batch", "1st batch s (compile)",
            "Market query+gallery min", "peak RSS GiB", "device peak GiB")
  print(f"feature extraction, {args.height}x{args.width}, flip-averaged {row['feature_dim']}-d, "
        f"{args.steps} batches x {args.repeats} repeats on {device.device_kind}")
  print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
  peak = "-" if row["device_peak_bytes"] is None else f"{row['device_peak_bytes'] / 2**30:.2f}"
  print(f"| laga | {args.dtype} | {args.batch} | {len(devices)} | {rate:.2f} | {row['ms_per_batch']:.0f} | "
        f"{first_s:.1f} | {row['market_eval_extraction_minutes']:.1f} | "
        f"{row['process_peak_rss_bytes'] / 2**30:.2f} | {peak} |")
  load_after = os.getloadavg()
  print(f"load average before: {load_before[0]:.2f}, after: {load_after[0]:.2f} ({os.cpu_count()} CPUs); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.out:
    report = {"args": vars(args), "results": [row], "device": device.device_kind, "platform": device.platform,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_before": load_before,
              "load_average_after": load_after}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
