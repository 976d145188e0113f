"""Time ranking many queries against a large gallery index, as `run.py --mode search` does after extraction.

  python benchmarks/search.py --out benchmarks/results/search.json
  python benchmarks/search.py --queries 1000 --gallery 100000 --dims 256,2048 --topk 10

Random L2-normalised features (ranking time does not depend on their values). For each feature size: the
first call of `laga_jax.inference.rank` (compilation included), the median of `--repeats` further calls, and a
check of the top-k of 20 queries against a NumPy stable argsort of the full distance rows.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from laga_jax import inference  # noqa: E402


def normalised(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
  features = rng.standard_normal((rows, dim), dtype=np.float32)
  return features / np.linalg.norm(features, axis=1, keepdims=True)


def bench(num_queries: int, num_gallery: int, dim: int, topk: int, repeats: int, query_chunk: int) -> dict:
  import jax
  rng = np.random.default_rng(dim)
  query, gallery = normalised(rng, num_queries, dim), normalised(rng, num_gallery, dim)
  gallery_on_device = jax.device_put(gallery)  # the index stays on the device between searches
  start = time.perf_counter()
  indices, distances = inference.rank(query, gallery_on_device, topk, query_chunk=query_chunk)
  first = time.perf_counter() - start
  times, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    indices, distances = inference.rank(query, gallery_on_device, topk, query_chunk=query_chunk)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  check = np.arange(0, num_queries, max(1, num_queries // 20))[:20]
  reference = 1.0 - query[check] @ gallery.T
  expected = np.argsort(reference, axis=1, kind="stable")[:, :topk]
  agree = float(np.mean(indices[check] == expected))
  return {"num_queries": num_queries, "num_gallery": num_gallery, "dim": dim, "topk": topk,
          "query_chunk": query_chunk, "first_call_s": round(first, 3), "median_s": round(float(np.median(times)), 3),
          "runs_s": [round(t, 3) for t in times], "median_cpu_s": round(float(np.median(cpu)), 3),
          "index_gib": round(gallery.nbytes / 2**30, 3), "gflop": round(2 * num_queries * num_gallery * dim / 1e9, 1),
          "topk_agrees_with_numpy": agree, "device": str(jax.devices()[0])}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--gallery", type=int, default=100_000)
  parser.add_argument("--dims", default="256,2048", help="comma-separated feature sizes")
  parser.add_argument("--topk", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--query-chunk", type=int, default=1024)
  parser.add_argument("--out", default=None, help="JSON file for the results")
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  results = []
  for dim in (int(d) for d in args.dims.split(",")):
    row = bench(args.queries, args.gallery, dim, args.topk, args.repeats, args.query_chunk)
    print(json.dumps(row))
    results.append(row)
  out = {"machine": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "load_average_before": load_before, "load_average_after": os.getloadavg()},
         "command": "python benchmarks/search.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "results": results}
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
