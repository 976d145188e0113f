"""Time `evaluate_ranking` on random Market-1501- and MSMT17-sized distance matrices.

  python benchmarks/ranking.py --out benchmarks/results/ranking.json
  python benchmarks/ranking.py --sizes market --naive-queries 100 --rerank-dim 128

For each size: wall time of the first call (compilation included) and of a second call, peak resident
memory above the input, equality with a naive per-query loop (stable argsort) on a subset of queries and
with an unchunked run of that subset, and the naive loop's time extrapolated to all queries.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from laga_jax.evaluation import metrics  # noqa: E402

# (queries, gallery, matches per query, cameras): the real sets' sizes, random ids and cameras.
SIZES = {"market": (3368, 15913, 4.7, 6), "msmt": (11659, 82161, 27.0, 15)}


def random_problem(num_q: int, num_g: int, matches: float, cameras: int, seed: int = 0):
  """Uniform random distances; ids drawn so a query has about `matches` same-id other-camera items."""
  rng = np.random.default_rng(seed)
  num_ids = max(1, round(num_g * (1 - 1 / cameras) / matches))
  labels = (rng.integers(1, num_ids + 1, num_q), rng.integers(1, num_ids + 1, num_g),
            rng.integers(0, cameras, num_q), rng.integers(0, cameras, num_g))
  return rng.random((num_q, num_g), dtype=np.float32), labels


def naive_per_query(distmat, q_pids, g_pids, q_camids, g_camids):
  """Torchreid-style reference: per query a full (stable) argsort, removal, cumulative sums."""
  first, ap, ap_step, inp = [], [], [], []
  for i in range(len(distmat)):
    order = np.argsort(distmat[i], kind="stable")
    keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
    hits = np.flatnonzero((g_pids[order] == q_pids[i])[keep])
    if len(hits) == 0:
      first.append(-1), ap.append(np.nan), ap_step.append(np.nan), inp.append(np.nan)
      continue
    nth = np.arange(len(hits))
    precision = (nth + 1) / (hits + 1)
    previous = np.where(hits > 0, nth / np.maximum(hits, 1), 1.0)
    first.append(hits[0]), ap.append(np.mean((previous + precision) / 2)), ap_step.append(precision.mean())
    inp.append(len(hits) / (hits[-1] + 1))
  return {"first_rank": np.array(first), "ap": np.array(ap), "ap_step": np.array(ap_step), "inp": np.array(inp)}


class PeakRss:
  """Samples this process's resident memory every few milliseconds; `peak` is the largest seen."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  @staticmethod
  def current() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.current())
      time.sleep(self.interval)

  def __enter__(self):
    self.peak = self.current()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.current())


def bench(name: str, naive_queries: int, check_queries: int) -> dict:
  num_q, num_g, matches, cameras = SIZES[name]
  distmat, labels = random_problem(num_q, num_g, matches, cameras)
  baseline = PeakRss.current()
  with PeakRss() as rss:
    start = time.perf_counter()
    first = metrics.evaluate_ranking(distmat, *labels)
    first_s = time.perf_counter() - start
  start = time.perf_counter()
  cpu = time.process_time()
  again = metrics.evaluate_ranking(distmat, *labels)
  warm_s, warm_cpu_s = time.perf_counter() - start, time.process_time() - cpu
  assert again["mAP"] == first["mAP"]

  subset = np.random.default_rng(1).choice(num_q, size=min(check_queries, num_q), replace=False)
  sub_labels = (labels[0][subset], labels[1], labels[2][subset], labels[3])
  fast = metrics.query_metrics(distmat[subset], *sub_labels)
  whole = metrics.query_metrics(distmat[subset], *sub_labels, query_chunk=len(subset))
  start = time.perf_counter()
  reference = naive_per_query(distmat[subset[:naive_queries]], labels[0][subset[:naive_queries]], labels[1],
                              labels[2][subset[:naive_queries]], labels[3])
  naive_per_query_s = (time.perf_counter() - start) / min(naive_queries, len(subset))
  naive_fast = {k: v[:naive_queries] for k, v in fast.items()}
  equal_naive = bool(np.array_equal(naive_fast["first_rank"], reference["first_rank"]) and all(
      np.allclose(naive_fast[k], reference[k], rtol=1e-12, atol=0, equal_nan=True) for k in ("ap", "ap_step", "inp")))
  equal_unchunked = all(np.array_equal(fast[k], whole[k], equal_nan=True) for k in fast)
  return {
      "size": name, "num_queries": num_q, "num_gallery": num_g, "cameras": cameras,
      "matches_per_query": float(np.mean(fast["num_matches"][fast["num_matches"] > 0])),
      "first_call_s": round(first_s, 3), "second_call_s": round(warm_s, 3), "second_call_cpu_s": round(warm_cpu_s, 3),
      "peak_rss_above_input_gib": round((rss.peak - baseline) / 2**30, 3),
      "input_gib": round(distmat.nbytes / 2**30, 3),
      "naive_queries_timed": min(naive_queries, len(subset)),
      "naive_extrapolated_s": round(naive_per_query_s * num_q, 1),
      "speedup_vs_naive": round(naive_per_query_s * num_q / warm_s, 1),
      "equal_to_naive_on_subset": equal_naive, "equal_to_unchunked_on_subset": equal_unchunked,
      "checked_queries": len(subset), "mAP": first["mAP"], "rank1": float(first["cmc"][0]),
  }


def bench_rerank(dim: int) -> dict:
  """Re-ranked evaluation from Market-sized synthetic features (clustered by id, `dim`-d)."""
  num_q, num_g, _, cameras = SIZES["market"]
  rng = np.random.default_rng(0)
  q_pids, g_pids = rng.integers(0, 751, num_q), rng.integers(0, 751, num_g)
  centres = rng.normal(size=(751, dim)).astype(np.float32)
  qf = centres[q_pids] + 2 * rng.normal(size=(num_q, dim)).astype(np.float32)
  gf = centres[g_pids] + 2 * rng.normal(size=(num_g, dim)).astype(np.float32)
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  cams = rng.integers(0, cameras, num_q), rng.integers(0, cameras, num_g)
  plain = metrics.evaluate_features(qf, gf, q_pids, g_pids, *cams)
  baseline = PeakRss.current()
  with PeakRss() as rss:
    start = time.perf_counter()
    reranked = metrics.evaluate_features(qf, gf, q_pids, g_pids, *cams, rerank=True)
    seconds = time.perf_counter() - start
  return {"size": f"market-rerank-{dim}d", "num_queries": num_q, "num_gallery": num_g, "feature_dim": dim,
          "rerank_eval_s": round(seconds, 2), "peak_rss_above_input_gib": round((rss.peak - baseline) / 2**30, 3),
          "mAP": plain["mAP"], "mAP_reranked": reranked["mAP"],
          "rank1": float(plain["cmc"][0]), "rank1_reranked": float(reranked["cmc"][0])}


def run_isolated(name: str, naive_queries: int, check_queries: int) -> dict:
  """`bench` in a fresh process, so memory one size freed cannot hide another's peak."""
  command = [sys.executable, __file__, "--sizes", name, "--naive-queries", str(naive_queries),
             "--check-queries", str(check_queries), "--child"]
  return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="market,msmt", help="comma-separated: " + ", ".join(SIZES))
  parser.add_argument("--naive-queries", type=int, default=200, help="queries timed in the naive loop")
  parser.add_argument("--check-queries", type=int, default=500, help="queries compared with the references")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  parser.add_argument("--rerank-dim", type=int, default=0,
                      help="also time a re-ranked evaluation of Market-sized features of this size (0: skip)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(bench(args.sizes, args.naive_queries, args.check_queries)))
    return
  reranked = bench_rerank(args.rerank_dim) if args.rerank_dim else None
  load = os.getloadavg()
  rows = [run_isolated(name, args.naive_queries, args.check_queries) for name in args.sizes.split(",")]
  header = ("size", "Q x G", "1st call s", "2nd call s (CPU s)", "peak RSS above input GiB",
            "naive loop s (extrap.)", "speed-up", "equal to references")
  print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
  for r in rows:
    print(f"| {r['size']} | {r['num_queries']} x {r['num_gallery']} | {r['first_call_s']} | "
          f"{r['second_call_s']} ({r['second_call_cpu_s']}) | {r['peak_rss_above_input_gib']} | "
          f"{r['naive_extrapolated_s']} | {r['speedup_vs_naive']}x | "
          f"{r['equal_to_naive_on_subset'] and r['equal_to_unchunked_on_subset']} |")
  if reranked:
    print(f"re-ranked evaluation, Market-sized {reranked['feature_dim']}-d features: {reranked['rerank_eval_s']} s, "
          f"peak RSS +{reranked['peak_rss_above_input_gib']} GiB, mAP {reranked['mAP']:.4f} -> "
          f"{reranked['mAP_reranked']:.4f}")
  print(f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_before": load, "load_average_after": os.getloadavg()}
    report = {"machine": info, "results": rows, "rerank": reranked}
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
  main()
