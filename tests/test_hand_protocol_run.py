"""The hand protocol end to end: run.py on the generated hand set (and the parser plus one evaluation draw on
real 11k images where they are present)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_py_env
from data_pipelines import datasets, image_check, input_pipeline
from data_pipelines.datasets import common, hands11k
from laga_jax.evaluation import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The protocol, not the accuracy: most of this run is compiling LAGA-Net (about a minute of CPU on two cores
# whatever the step count), so it trains 3 epochs (each with a validation pass and a checkpoint) of 8 steps
# on a small generated set. The full demo's learning (rank-1 and mAP against the untrained model) is
# measured by `python run.py --config configs/demo_hands.py` itself (README).
SMALL_SET = dict(num_ids=24, min_images=4, max_images=6, few_image_ids=3, missing_aspect_ids=2, height=60,
                 width=80)
FAST = ["--config.data.image_size=(32,32)", "--config.data.resize_size=(36,36)", "--config.train.num_epochs=3",
        "--config.train.steps_per_epoch=8", "--config.train.log_every_steps=4", "--config.optim.warmup_epochs=0",
        "--config.optim.lr=3e-3", "--config.optim.decay_epochs=(3,)", "--config.eval.num_figures=0"]


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
  from data_pipelines import demo_hands
  root = tmp_path_factory.mktemp("hands")
  demo_hands.generate_demo_hands(root / "data", **SMALL_SET)  # used as found: the config's root holds a set
  env = run_py_env(LAGA_CACHE_DIR=str(root / "cache"))
  done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--config", "configs/demo_hands.py", "--workdir",
                         str(root / "run"), f"--config.data.root={root / 'data'}", *FAST], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return root, done


def test_hand_demo_runs_the_protocol(hand_run):
  root, done = hand_run
  workdir = root / "run"
  results = json.loads((workdir / "results.json").read_text())
  assert results["protocol"] == "hand" and len(results["draws"]) == 10
  assert len({(d["rank1"], d["mAP"]) for d in results["draws"]}) > 1  # ten different draws, not one ten times
  # The checkpoint with the best validation accuracy (ties: the later epoch) is the one evaluated.
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  val = [m for m in logged if "val_accuracy" in m]
  assert [m["step"] for m in val] == [8, 16, 24]
  best = max(v["val_accuracy"] for v in val)
  best_step = max(v["step"] for v in val if v["val_accuracy"] == best)
  assert results["evaluated"] == {"checkpoint": "best", "step": best_step, "epoch": best_step // 8,
                                  "val_accuracy": best}
  assert [p.name for p in (workdir / "best").iterdir()] == [str(best_step)]
  # Each query set meets the combined gallery of all four aspects (one image per test id and aspect).
  splits = datasets.load_splits("demo_hands", root / "data")
  assert results["num_gallery"] == len(splits["gallery"]) > len({r.pid for r in splits["query"]})
  assert {r.pid // 10_000_000 for r in splits["gallery"]} == {0, 1, 2, 3}
  assert results["num_query"] == len(splits["query"])
  # It trains: the loss falls from the first logging window to the last.
  losses = [m["loss"] for m in logged if "loss" in m]
  assert losses[-1] < losses[0], losses
  assert "untrained" in results and "rank-1" in done.stdout and "untrained" in done.stdout


# --- real 11k images -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_11k(realdata_dir, tmp_path_factory):
  """An 11k folder: the real HandInfo.csv, the real (downscaled) images it has, empty stand-ins for the rest."""
  source = realdata_dir / "11k"
  if not (source / "HandInfo.csv").is_file():
    pytest.skip(f"real 11k metadata not found at {source}")
  root = tmp_path_factory.mktemp("11k")
  os.symlink(source / "HandInfo.csv", root / "HandInfo.csv")
  (root / "Hands").mkdir()
  real = {p.name: p for p in (source / "Hands_resized180").glob("*.jpg")}
  placeholder = root / ".placeholder"
  placeholder.touch()
  for row in hands11k.read_hand_info(source / "HandInfo.csv"):
    target = root / "Hands" / row.image_name
    if row.image_name in real:
      os.symlink(real[row.image_name], target)
    else:
      os.link(placeholder, target)
  return root, set(real)


def test_11k_parser_and_one_evaluation_draw_on_real_images(real_11k, monkeypatch):
  root, real = real_11k
  monkeypatch.setenv("LAGA_CACHE_DIR", str(root / "cache"))
  splits = datasets.load_splits("11k_dorsal_right", root, draw=0)
  num_classes = len({r.label for r in splits["train"]})
  assert num_classes == 72 and all(0 <= r.label < num_classes for r in splits["val"])
  assert len(splits["gallery"]) == 290
  # One seeded draw of the protocol over the real photos (their own aspect's test ids; the other aspects'
  # real test photos join the gallery with their ids offset, as in the combined gallery).
  is_real = lambda r: os.path.basename(r.path) in real
  rows = hands11k.read_hand_info(root / "HandInfo.csv")
  gallery, query = [], []
  for aspect in hands11k.ASPECTS:
    _, test = hands11k.split_identities(rows, aspect, root / "Hands")
    drawn, rest = common.draw_gallery([r for r in test if is_real(r)], 0, 0, hands11k.ASPECTS.index(aspect))
    if aspect == "dorsal right":
      gallery, query = gallery + drawn, rest
    else:
      offset = hands11k.GALLERY_ID_OFFSETS["dorsal right"][aspect]
      gallery += [dataclasses.replace(r, pid=r.pid + offset) for r in drawn]
  assert query and {r.pid for r in query} <= {r.pid for r in gallery} and len(gallery) > 3
  assert image_check.check_files([r.path for r in query + gallery]) == {}
  stand_in = next(r.path for r in splits["query"] if not is_real(r))
  assert image_check.check_files([stand_in]) == {stand_in: "empty file"}
  # One draw of the hand protocol: the eval input pipeline on the real photos, then CMC / mAP.
  config = __import__("configs.demo_hands", fromlist=["get_config"]).get_config()
  config.data.image_size, config.data.resize_size = (32, 32), (36, 36)
  records = query + gallery
  pixels = np.concatenate([b["image"][b["mask"]] for b in
                           input_pipeline.eval_batches(records, config.data, 16).as_numpy_iterator()])
  assert pixels.shape == (len(records), 32, 32, 3) and np.isfinite(pixels).all()
  features = pixels.reshape(len(records), -1)
  features = features / np.linalg.norm(features, axis=1, keepdims=True)
  pids = np.asarray([r.pid for r in records])
  draw = (np.arange(len(query)), np.arange(len(query), len(records)))
  scored = metrics.evaluate_draws(features, pids, [draw])
  summary = scored["draws"][0]
  assert 0.0 <= summary["rank1"] <= 1.0 and 0.0 < summary["mAP"] <= 1.0
