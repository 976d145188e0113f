"""Train (or reuse) and evaluate several configs on one dataset, and lay them side by side.

  python -m laga_jax.compare --out runs/compare \
      --configs configs/demo.py,configs/demo.py:bot,configs/demo.py:global [--eval_datasets demo,demo_b]

Each config runs in `<out>/<label>`. Labels (`label_of`) are the model's registry name for a config without an
argument or whose argument is its dataset (`configs/demo.py` -> `laga`, `configs/pcb.py:market1501` -> `pcb`,
`configs/pcb.py:market1501_rpp` -> `pcb_rpp`), else the argument (`configs/demo.py:bot` -> `bot`,
`configs/ablation.py:global` -> `global`); `--labels` names them explicitly.

A workdir whose results.json covers every requested target is reused as it is; an unfinished one resumes
from its last checkpoint; a finished one missing a target, or evaluated with other `eval` options, is
evaluated again without training. A workdir trained with another recipe (any config field that changes what
is learned, i.e. outside `eval` and `RUN_ONLY_FIELDS`) is refused with the differing fields named: delete
it or choose another `--out`, so a table never mixes two recipes under one label.

Chained stages: a config that sets `model.init_from` and follows a config of the same model on the same
dataset starts from that config's workdir (PCB -> RPP -> fine-tuning: `configs/pcb.py:market1501`,
`configs/pcb.py:market1501_rpp`, `configs/pcb.py:market1501_rpp_finetune` in this order).

Writes `<out>/comparison.{md,json,png}`: parameters, GFLOPs per image (XLA's cost analysis of the eval forward
pass), train and extraction images/s on this machine, rank-1/5, mAP, mINP, each cross-dataset target, and a
query-by-query comparison of every model with the first on the first target.
"""

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("laga_jax")

METRICS = ("rank1", "rank5", "mAP", "mINP")


def load_config(spec: str):
  """A config from "path/to/config.py[:arg]", as `run.py --config` reads it."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"--configs: {path} is not a config file")
  module_spec = importlib.util.spec_from_file_location(f"_compare_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def label_of(spec: str, config) -> str:
  """The folder and table name of the config `spec` ("path[:arg]") that loaded as `config` (see the module
  docstring): the model name when the argument is absent or is the dataset, plus what follows the dataset
  name (a training stage); otherwise the argument."""
  _, _, arg = spec.partition(":")
  model, dataset = str(config.model.name), str(config.data.name)
  if not arg or arg == dataset or "/" in arg or arg.endswith(".json"):  # a saved config.json: its model
    label = model
  elif arg.startswith(dataset + "_"):
    label = f"{model}_{arg[len(dataset) + 1:]}"
  else:
    label = arg
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _labels(specs: Sequence[str], configs: Sequence[Any], given: Sequence[str]) -> List[str]:
  """The label of every spec (`given` when not empty), checked to be unique folder names."""
  if given:
    if len(given) != len(specs):
      raise ValueError(f"--labels: {len(given)} label(s) for {len(specs)} config(s); give one per config")
    bad = [g for g in given if not re.fullmatch(r"[A-Za-z0-9_.-]+", g) or g in (".", "..")]
    if bad:
      raise ValueError(f"--labels: {', '.join(map(repr, bad))} cannot name a folder; use letters, digits, "
                       "'_', '-' and '.'")
    labels = list(given)
  else:
    labels = [label_of(s, c) for s, c in zip(specs, configs)]
  seen: Dict[str, str] = {}
  for spec, label in zip(specs, labels):
    if label in seen:
      raise ValueError(f"--configs: {seen[label]} and {spec} both get the label {label!r}; name every config "
                       "with --labels, e.g. --labels " + ",".join(f"{l}_{i}" for i, l in enumerate(labels)))
    seen[label] = spec
  return labels


# Config fields that never change what a run learns: where and how fast it runs, what it logs and keeps. The
# dataset root is one of them for the reason the checkpoint fingerprint leaves it out: a dataset is its name
# and options, and a moved copy is the same data.
RUN_ONLY_FIELDS = ("mode", "data.root", "data.cache_decoded", "data.num_parallel_calls", "data.bad_images",
                   "train.parallel", "train.num_devices", "train.distributed", "train.log_every_steps",
                   "train.checkpoint_every_epochs", "train.keep_checkpoints")
# `eval` fields that decide which targets are evaluated, not how (coverage is checked target by target).
TARGET_FIELDS = ("eval.datasets",)


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """{"section.field": value} of a config or its JSON, values as JSON would read them back (tuples as lists)."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out: Dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "to_dict"):
      out.update(_flat(value, path + "."))
    else:
      out[path] = json.loads(json.dumps(value, default=list))
  return out


def config_differences(saved: Any, wanted: Any, *, section: Optional[str] = None) -> List[str]:
  """"field: saved X, configured Y" for every field that differs between two configs (or their JSON): the
  fields that change what is learned (all but `eval` and RUN_ONLY_FIELDS), or with `section` only that
  section's (less TARGET_FIELDS)."""
  old, new = _flat(saved), _flat(wanted)
  if section is None:
    keep = lambda k: not k.startswith("eval.") and k not in RUN_ONLY_FIELDS
  else:
    keep = lambda k: k.startswith(section + ".") and k not in TARGET_FIELDS
  missing = "(absent)"
  return [f"{k}: saved {old.get(k, missing)!r}, configured {new.get(k, missing)!r}"
          for k in sorted(k for k in set(old) | set(new) if keep(k)) if old.get(k, missing) != new.get(k, missing)]


def check_reusable(workdir: pathlib.Path, config) -> None:
  """Refuse a workdir trained with another recipe than `config` (the differing fields named)."""
  saved = workdir / "config.json"
  if not saved.exists():
    return
  differences = config_differences(json.loads(saved.read_text()), config)
  if differences:
    raise ValueError(f"{workdir} was trained with another recipe than its config: " + "; ".join(differences)
                     + f". Delete {workdir} to retrain it, or give another --out")


def chain_stages(configs: Sequence[Any], labels: Sequence[str], out_dir: pathlib.Path) -> None:
  """Point `model.init_from` of every later training stage at the workdir of the stage listed before it.

  A config that sets `init_from` and follows a config of the same model on the same dataset is that model's
  next stage (PCB -> RPP -> fine-tuning, paper Sec. 3.3): its configured path names where the previous stage
  runs outside a comparison, and here that stage runs in `<out>/<label>`.
  """
  for i in range(1, len(configs)):
    config, previous = configs[i], configs[i - 1]
    if (config.model.get("init_from", "") and previous.model.name == config.model.name
        and previous.data.name == config.data.name):
      config.model.init_from = str(out_dir / labels[i - 1])
      log.info("%s: initialised from %s (the stage before it)", labels[i], config.model.init_from)


def _finished(workdir: pathlib.Path, targets: Sequence[str], config) -> Optional[dict]:
  """The saved results of a finished run that cover every target with `config`'s evaluation options, else
  None (then the run is trained, resumed or evaluated again)."""
  path = workdir / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  have = set(results.get("targets", {})) or {results.get("dataset")}
  if not set(targets) <= have:
    return None
  if config_differences(results.get("config", {}), config, section="eval"):
    return None
  return results


def per_query_file(workdir: pathlib.Path, results: dict, config) -> pathlib.Path:
  """The per-query scores of the first target, the one whose metrics the table shows first.

  The evaluation names the file in each target's block; older results without that name follow its rule:
  `per_query_final.npz` for the training set, `per_query_final_<target>.npz` for another.
  """
  if results.get("per_query_file"):
    return workdir / results["per_query_file"]
  first = results.get("dataset", config.data.name)
  suffix = "" if first == config.data.name else f"_{first}"
  return workdir / f"per_query_final{suffix}.npz"


def model_cost(config, num_classes: int) -> Dict[str, float]:
  """Parameters (the model's, without classifier-independent loss parameters) and GFLOPs of one image's
  eval forward pass at the config's image size, from XLA's cost analysis of the compiled computation."""
  import jax
  import jax.numpy as jnp
  from laga_jax import models
  module = models.get_model(config.model.name)
  model = module.build(config.model, num_classes)
  image = jnp.zeros((1,) + tuple(config.data.image_size) + (3,), jnp.float32)
  variables = jax.eval_shape(lambda r: model.init(r, image, train=False), jax.random.PRNGKey(0))
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
  compiled = jax.jit(lambda v, x: module.eval_features(model.apply(v, x, train=False))).lower(
      variables, image).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"params": params, "gflops": float(cost.get("flops", float("nan"))) / 1e9}


def extraction_speed(config, num_classes: int, variables: Any, *, repeats: int = 3) -> float:
  """Flip-averaged feature extraction, images/s, on random eval batches of `config.eval.batch_size`
  (after one compiling batch; median of `repeats`)."""
  import jax
  import jax.numpy as jnp
  from laga_jax import models
  from laga_jax.evaluation import features
  module = models.get_model(config.model.name)
  model = module.build(config.model, num_classes)

  def feature_fn(v, images):
    return module.eval_features(model.apply(v, images, train=False))

  batch = jnp.asarray(np.random.default_rng(0).standard_normal(
      (config.eval.batch_size,) + tuple(config.data.image_size) + (3,)), jnp.float32)
  features.flip_sum_normalise(feature_fn, variables, batch).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    features.flip_sum_normalise(feature_fn, variables, batch).block_until_ready()
    times.append(time.perf_counter() - start)
  return config.eval.batch_size / float(np.median(times))


def train_speed(workdir: pathlib.Path) -> Optional[float]:
  """The run's training images/s: the last value logged in metrics.jsonl (its running average)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return None
  values = [json.loads(line).get("images_per_second") for line in path.read_text().splitlines() if line.strip()]
  values = [v for v in values if v]
  return float(values[-1]) if values else None


def query_by_query(per_query: Dict[str, dict]) -> List[dict]:
  """For each model after the first: queries it gets right at rank 1 that the first misses, and back."""
  names = list(per_query)
  if len(names) < 2:
    return []
  base_name = names[0]
  base = per_query[base_name]
  out = []
  for name in names[1:]:
    other = per_query[name]
    if list(other["paths"]) != list(base["paths"]):
      continue
    base_hit, other_hit = base["first_rank"] == 0, other["first_rank"] == 0
    out.append({"model": name, "versus": base_name, "only_model": int(np.sum(other_hit & ~base_hit)),
                "only_versus": int(np.sum(base_hit & ~other_hit)), "both": int(np.sum(base_hit & other_hit)),
                "neither": int(np.sum(~base_hit & ~other_hit)), "num_queries": int(len(base_hit))})
  return out


def _pct(value: Optional[float]) -> str:
  return "–" if value is None else f"{100 * value:.2f}"


def write_markdown(path: pathlib.Path, rows: List[dict], targets: Sequence[str], pairs: List[dict],
                   machine: str) -> None:
  cross = list(targets[1:])
  head = ["model", "config", "params (M)", "GFLOPs/img", "train img/s", "extract img/s", "rank-1", "rank-5",
          "mAP", "mINP"] + [f"{t} rank-1 / mAP" for t in cross]
  lines = [f"Comparison on `{targets[0]}` ({machine}). Accuracy in %; GFLOPs from XLA's cost analysis of one "
           "image's eval forward pass; speeds measured on this machine.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    cells = [row["label"], f"`{row['config']}`", f"{row['params'] / 1e6:.2f}", f"{row['gflops']:.3f}",
             "–" if row["train_images_per_second"] is None else f"{row['train_images_per_second']:.1f}",
             f"{row['extract_images_per_second']:.1f}"]
    cells += [_pct(row["metrics"].get(k)) for k in METRICS]
    for t in cross:
      block = row["targets"].get(t, {})
      cells.append(f"{_pct(block.get('rank1'))} / {_pct(block.get('mAP'))}")
    lines.append("| " + " | ".join(cells) + " |")
  untrained = [row for row in rows if "untrained" in row]
  if untrained:
    # The same initialisation as each trained row, scored on every target: what training adds.
    head = ["model (untrained)", f"{targets[0]} rank-1 / mAP"] + [f"{t} rank-1 / mAP" for t in cross]
    lines += ["", "Untrained models (the same initialisation, before training):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in untrained:
      cells = [row["label"], f"{_pct(row['untrained'].get('rank1'))} / {_pct(row['untrained'].get('mAP'))}"]
      for t in cross:
        block = row.get("untrained_targets", {}).get(t, {})
        cells.append(f"{_pct(block.get('rank1'))} / {_pct(block.get('mAP'))}")
      lines.append("| " + " | ".join(cells) + " |")
  if pairs:
    lines += ["", f"Query by query (rank-1 hits on `{targets[0]}`):", "",
              "| model | versus | only model | only versus | both | neither |", "|---|---|---|---|---|---|"]
    for p in pairs:
      lines.append(f"| {p['model']} | {p['versus']} | {p['only_model']} | {p['only_versus']} | {p['both']} | "
                   f"{p['neither']} |")
  path.write_text("\n".join(lines) + "\n")


def write_plot(path: pathlib.Path, rows: List[dict], targets: Sequence[str]) -> None:
  """Grouped bars of rank-1 / mAP / mINP per model on the first target (a black tick: the untrained model's
  mAP), and mAP against GFLOPs per image: filled dots on the first target, open markers on the others."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
  labels = [row["label"] for row in rows]
  x = np.arange(len(rows))
  width = 0.26
  for i, key in enumerate(("rank1", "mAP", "mINP")):
    values = [100 * row["metrics"][key] for row in rows]
    drawn = bars.bar(x + (i - 1) * width, values, width, label={"rank1": "rank-1"}.get(key, key))
    bars.bar_label(drawn, fmt="%.1f", fontsize=7, padding=1)
  untrained = [(j, 100 * row["untrained"]["mAP"]) for j, row in enumerate(rows)
               if row.get("untrained", {}).get("mAP") is not None]
  if untrained:
    bars.hlines([v for _, v in untrained], [j - 0.5 * width for j, _ in untrained],
                [j + 0.5 * width for j, _ in untrained], colors="black", linewidth=2, label="untrained mAP")
  bars.set_xticks(x, labels)
  bars.set_ylabel("%")
  bars.set_ylim(0, 105)
  bars.set_title(f"Accuracy on {targets[0]}")
  bars.legend(loc="upper right", fontsize=8, ncols=2)
  # One neutral colour per point: the bar colours mean metrics, not models.
  markers = ("s", "^", "D", "v", "P")
  for row in rows:
    point = (row["gflops"], 100 * row["metrics"]["mAP"])
    scatter.scatter(*point, s=40, color="#333333", zorder=3)
    scatter.annotate(row["label"], point, textcoords="offset points", xytext=(6, 4), fontsize=9)
    for k, target in enumerate(targets[1:]):
      value = row["targets"].get(target, {}).get("mAP")
      if value is not None:
        scatter.plot([point[0], point[0]], [point[1], 100 * value], color="#bbbbbb", linewidth=0.8, zorder=1)
        scatter.scatter(point[0], 100 * value, s=40, facecolors="white", edgecolors="#333333",
                        marker=markers[k % len(markers)], zorder=3)
  handles = [plt.Line2D([], [], marker="o", linestyle="", color="#333333", label=targets[0])]
  handles += [plt.Line2D([], [], marker=markers[k % len(markers)], linestyle="", markerfacecolor="white",
                         markeredgecolor="#333333", label=f"{t} (cross-dataset)") for k, t in enumerate(targets[1:])]
  scatter.legend(handles=handles, loc="center right", fontsize=8)
  scatter.set_xlabel("GFLOPs per image (eval forward, XLA cost analysis)")
  scatter.set_ylabel("mAP (%)")
  scatter.set_title("mAP against cost")
  scatter.grid(alpha=0.3)
  values = [100 * r["metrics"]["mAP"] for r in rows]
  values += [100 * b["mAP"] for r in rows for t, b in r["targets"].items() if t in targets[1:] and b.get("mAP")]
  scatter.set_ylim(max(0, min(values) - 10), min(100, max(values) + 10))
  scatter.set_xlim(0, max(r["gflops"] for r in rows) * 1.35)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare(specs: Sequence[str], out: str, *, eval_datasets: str = "", overrides: Sequence[str] = (),
            labels: Sequence[str] = ()) -> dict:
  """Run every config spec (see module docstring) and write the comparison files; returns the JSON."""
  import jax
  from laga_jax import config_utils, trainer
  out_dir = pathlib.Path(out).absolute()
  configs = []
  for spec in specs:
    config = load_config(spec)
    for item in overrides:
      key, _, value = item.partition("=")
      _override(config, key, value)
    if eval_datasets:
      config.eval.datasets = eval_datasets
    config.mode = "train_eval"
    config_utils.validate_config(config)
    configs.append(config)
  labels = _labels(specs, configs, labels)
  dataset = configs[0].data.name if configs else None
  for spec, config in zip(specs, configs):
    if config.data.name != dataset:
      raise ValueError(f"--configs: {spec} trains on {config.data.name!r}, the first config on {dataset!r}; "
                       "a comparison is on one dataset")
  out_dir.mkdir(parents=True, exist_ok=True)
  targets = [n for n, _ in trainer.eval_targets(configs[0])] if configs else []
  rows, per_query = [], {}
  chain_stages(configs, labels, out_dir)
  for spec, label, config in zip(specs, labels, configs):
    names = [n for n, _ in trainer.eval_targets(config)]
    workdir = out_dir / label
    check_reusable(workdir, config)
    results = _finished(workdir, names, config)
    if results is None:
      if (workdir / "results.json").exists() and (workdir / "checkpoints").is_dir():
        log.info("%s: evaluating the trained model in %s", label, workdir)
        eval_config = config.copy_and_resolve_references()
        eval_config.mode = "eval"
        trainer.train_and_evaluate(eval_config, str(workdir))
      else:
        log.info("%s: training and evaluating in %s", label, workdir)
        trainer.train_and_evaluate(config, str(workdir))
      results = json.loads((workdir / "results.json").read_text())
    else:
      log.info("%s: reusing %s", label, workdir / "results.json")
    _, _, variables, meta, _ = trainer.load_trained_model(config, workdir, mode="eval")
    num_classes = int(meta["fingerprint"]["num_classes"])
    cost = model_cost(config, num_classes)
    row = {"label": label, "config": spec, "model": config.model.name, **cost,
           "train_images_per_second": train_speed(workdir),
           "extract_images_per_second": extraction_speed(config, num_classes, variables),
           "metrics": {k: results.get(k) for k in METRICS},
           "targets": {t: {k: b.get(k) for k in METRICS} for t, b in results.get("targets", {}).items()},
           "workdir": str(workdir)}
    if "untrained" in results:
      row["untrained"] = {k: results["untrained"].get(k) for k in METRICS}
      row["untrained_targets"] = {t: {k: b.get(k) for k in METRICS}
                                  for t, b in results["untrained"].get("targets", {}).items()}
    rows.append(row)
    pq = per_query_file(workdir, results, config)
    if pq.exists():
      per_query[label] = dict(np.load(pq))
  pairs = query_by_query(per_query)
  machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}, " \
            f"load average {os.getloadavg()[0]:.1f}"
  summary = {"dataset": dataset, "targets": targets, "machine": machine, "models": rows,
             "query_by_query": pairs}
  (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2))
  write_markdown(out_dir / "comparison.md", rows, targets, pairs, machine)
  write_plot(out_dir / "comparison.png", rows, targets)
  print((out_dir / "comparison.md").read_text())
  return summary


def _override(config, key: str, value: str) -> None:
  """`--set section.field=value`: the value parsed as a Python literal where it is one."""
  import ast
  node = config
  parts = key.split(".")
  for part in parts[:-1]:
    if part not in node:
      raise KeyError(f"--set {key}: no config section {part!r}")
    node = node[part]
  if parts[-1] not in node:
    raise KeyError(f"--set {key}: no config field {parts[-1]!r}")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  node[parts[-1]] = parsed


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m laga_jax.compare", description=__doc__.splitlines()[0])
  parser.add_argument("--configs", required=True,
                      help="comma-separated config specs, e.g. configs/demo.py,configs/demo.py:bot")
  parser.add_argument("--out", required=True, help="folder for the workdirs and comparison.{md,json,png}")
  parser.add_argument("--eval_datasets", default="",
                      help="evaluation targets for every config (config.eval.datasets), e.g. demo,demo_b")
  parser.add_argument("--labels", default="",
                      help="comma-separated names of the configs' rows and workdirs (default: see label_of)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field in every config, e.g. --set train.num_epochs=5")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  project = logging.getLogger("laga_jax")
  project.setLevel(logging.INFO)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  project.addHandler(handler)
  project.propagate = False
  try:
    compare([s for s in args.configs.split(",") if s], args.out, eval_datasets=args.eval_datasets,
            overrides=args.set, labels=[s for s in args.labels.split(",") if s])
  except (FileNotFoundError, ValueError, KeyError) as error:
    if os.environ.get("LAGA_DEBUG"):
      raise
    sys.exit(f"error: {error}\n(set LAGA_DEBUG=1 for the traceback)")


if __name__ == "__main__":
  # As run.py: TensorFlow only feeds data, so its start-up notices (and oneDNN kernels) are not wanted.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  main()
