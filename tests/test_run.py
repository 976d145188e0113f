"""End to end: run.py on the generated demo dataset, exact resume, and command-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from laga_jax import trainer
from laga_jax.checkpoint import Checkpointer, fingerprint

NUM_DEMO_IDS = 40  # training identities of the default demo dataset
ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.data.image_size=(64,32)", "--config.data.resize_size=(72,36)", "--config.model.width=8",
    "--config.model.reduction_dim=16", "--config.train.num_epochs=2", "--config.train.steps_per_epoch=3",
    "--config.eval.batch_size=64", "--config.eval.num_figures=2",
]


def _run(*args, cwd=ROOT):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  workdir = root / "run"
  done = _run("--config", "configs/demo.py", "--workdir", str(workdir),
              f"--config.data.root={root / 'data'}", *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, done


def test_demo_writes_results(demo_run):
  workdir, done = demo_run
  results = json.loads((workdir / "results.json").read_text())
  for key in ("rank1", "mAP", "mAP_step", "mINP"):
    assert 0.0 <= results[key] <= 1.0, key
    assert 0.0 <= results["untrained"][key] <= 1.0, key
  assert results["protocol"] == "body" and results["num_query"] > 0
  assert results["evaluated"]["step"] == 6
  assert results["config"]["data"]["name"] == "demo"
  assert "rank-1" in done.stdout and "untrained" in done.stdout
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines if "loss" in line] == [3, 6]
  assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
  assert (workdir / "ranked_results_final.png").stat().st_size > 1000
  assert any((workdir / "tensorboard").iterdir())
  saved = np.load(workdir / "features_final.npz")
  np.testing.assert_allclose(np.linalg.norm(saved["features"], axis=1), 1.0, rtol=1e-5)


def test_eval_mode_reuses_checkpoint(demo_run, tmp_path):
  workdir, _ = demo_run
  first = json.loads((workdir / "results.json").read_text())
  done = _run("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "eval",
              f"--config.data.root={workdir.parent / 'data'}", *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.loads((workdir / "results.json").read_text())
  assert again["rank1"] == pytest.approx(first["rank1"]) and again["mAP"] == pytest.approx(first["mAP"])


def test_search_mode(demo_run):
  workdir, _ = demo_run
  query_dir = workdir.parent / "data" / "query"
  query = sorted(query_dir.glob("*.jpg"))[0]
  done = _run("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "search",
              f"--query={query}", f"--gallery_dir={workdir.parent / 'data' / 'bounding_box_test'}", "--topk=5",
              *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  matches = json.loads((workdir / "search_results.json").read_text())["matches"]
  assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
  sims = [m["cosine_similarity"] for m in matches]
  assert sims == sorted(sims, reverse=True)


def test_unknown_config_key_is_named(tmp_path):
  done = _run("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.widht=8")
  assert done.returncode != 0
  assert "widht" in done.stderr


def test_bad_value_is_named(tmp_path):
  done = _run("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.rpe=diag")
  assert done.returncode != 0
  assert "--config.model.rpe='diag'" in done.stderr


def test_missing_dataset_folder_is_named(tmp_path):
  done = _run("--config", "configs/market.py", "--workdir", str(tmp_path),
              f"--config.data.root={tmp_path / 'nowhere'}")
  assert done.returncode != 0
  assert "nowhere" in done.stderr


def _tiny_config(root, **train):
  config = demo.get_config()
  config.data.root = str(root)
  config.data.image_size, config.data.resize_size = (32, 16), (36, 18)
  config.model.width, config.model.reduction_dim = 8, 16
  config.train.num_epochs, config.train.steps_per_epoch = 2, 3
  config.train.num_devices = 1
  config.mode = "train"
  config.update_from_flattened_dict({f"train.{k}": v for k, v in train.items()})
  return config


def _final_params(workdir, config, target):
  ckpt = Checkpointer(str(workdir), fingerprint(config, NUM_DEMO_IDS))
  tree, meta = ckpt.restore(target)
  ckpt.close()
  return tree, meta


def test_resume_reaches_the_same_parameters(tmp_path):
  """Stopped after 4 of 6 steps (mid-epoch) and resumed == 6 steps uninterrupted, bit for bit."""
  data = tmp_path / "data"
  trainer.train_and_evaluate(_tiny_config(data), str(tmp_path / "straight"))
  trainer.train_and_evaluate(_tiny_config(data, max_steps=4), str(tmp_path / "resumed"))
  exp = trainer.setup(_tiny_config(data), str(tmp_path / "probe"))
  assert exp.num_classes == NUM_DEMO_IDS
  target = trainer.create_state(exp).checkpoint_tree()
  stopped, meta = _final_params(tmp_path / "resumed", _tiny_config(data), target)
  assert int(stopped["step"]) == 4 and meta["epoch"] == 1
  trainer.train_and_evaluate(_tiny_config(data), str(tmp_path / "resumed"))
  straight, _ = _final_params(tmp_path / "straight", _tiny_config(data), target)
  resumed, _ = _final_params(tmp_path / "resumed", _tiny_config(data), target)
  assert int(straight["step"]) == int(resumed["step"]) == 6
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(straight),
                               jax.tree_util.tree_leaves_with_path(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  # And training did something between step 4 and step 6.
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(stopped["params"]),
                                                    jax.tree_util.tree_leaves(resumed["params"]))]
  assert any(moved)
