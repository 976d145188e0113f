"""End to end: run.py on the generated demo dataset, exact resume, and command-line errors."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import TINY_LAGA, run_py
from conftest import TINY_RUN as TINY
from configs import demo
from laga_jax import trainer
from laga_jax.checkpoint import Checkpointer, fingerprint

NUM_DEMO_IDS = 40  # training identities of the default demo dataset


@pytest.fixture
def demo_run(trained_run, tmp_path):
  """(workdir, data root, CompletedProcess) of the session's tiny demo run (conftest.trained_run), the workdir
  copied so that the jobs a test runs in it leave the shared one as it was (tests that only read it, or copy
  it themselves, take `trained_run`)."""
  workdir, data, done = trained_run
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run", data, done


def test_demo_writes_results(trained_run):
  workdir, _, done = trained_run
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


# What a run itself writes to stderr: the project's log ("HH:MM:SS message", run.py's handler) and its
# progress lines (laga_jax/logging_utils.py: "train: ...", "features: ...").
OWN_LINE = re.compile(r"^(\d\d:\d\d:\d\d |(train|features): )")


def test_a_normal_run_prints_no_library_warnings(trained_run):
  """No library speaks during a normal run: not orbax's "Waiting for previous save to complete" at every
  checkpoint (two here), no absl, TensorFlow or Python warnings; every stderr line is one of ours."""
  _, _, done = trained_run
  lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
  assert any(line.startswith("train: ") for line in lines), done.stderr[-2000:]
  foreign = [line for line in lines if not OWN_LINE.match(line) or "WARNING" in line
             or "Waiting for previous save" in line]
  assert not foreign, "\n".join(foreign[:20])


def test_eval_mode_reuses_checkpoint_on_two_datasets(demo_run, tmp_path):
  """--mode eval on the training set and on a second site (demo_b): one results.json, a block per target,
  the training-set numbers unchanged, the untrained model scored on demo_b too, no fingerprint refusal."""
  workdir, data, _ = demo_run
  first = json.loads((workdir / "results.json").read_text())
  done = run_py("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "eval",
              f"--config.data.root={data}", "--config.eval.datasets=demo,demo_b", *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  again = json.loads((workdir / "results.json").read_text())
  assert set(again["targets"]) == {"demo", "demo_b"}
  demo_block, other = again["targets"]["demo"], again["targets"]["demo_b"]
  assert demo_block["rank1"] == pytest.approx(first["rank1"]) and demo_block["mAP"] == pytest.approx(first["mAP"])
  assert other["num_query"] > 0 and 0.0 <= other["mAP"] <= 1.0
  assert set(again["untrained"]["targets"]) == {"demo", "demo_b"}
  assert (workdir / "features_final_demo_b.npz").exists() and (workdir / "per_query_final_demo_b.npz").exists()
  assert (workdir / "maps_final_demo_b.png").stat().st_size > 1000
  per_query = np.load(workdir / "per_query_final.npz")
  assert len(per_query["ap"]) == first["num_query"]
  assert np.nanmean(per_query["ap"]) == pytest.approx(first["mAP"], rel=1e-6)


def test_eval_needs_no_training_split(demo_run, trained_run, tmp_path):
  """--mode eval on targets that hold only query and gallery: a Market-layout copy without
  bounding_box_train/ and a `custom` tree without train/, both of the demo's test images, score as the
  training set's own evaluation does."""
  run, data, _ = demo_run
  market = tmp_path / "test_only"
  market.mkdir()
  for folder in ("query", "bounding_box_test"):
    os.symlink(data / folder, market / folder)
  custom = tmp_path / "custom"
  for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
    for image in (data / folder).glob("*.jpg"):
      pid = int(image.name.split("_")[0])
      if pid < 0:  # junk boxes, which the Market-layout parser drops too
        continue
      (custom / split / str(pid)).mkdir(parents=True, exist_ok=True)
      os.symlink(image, custom / split / str(pid) / image.name)
  done = run_py("--config", "configs/demo.py", "--workdir", str(run), "--mode", "eval",
              f"--config.data.root={data}", f"--config.eval.datasets=demo={market},custom={custom}", *TINY_LAGA,
              "--config.eval.evaluate_untrained=False", "--config.eval.num_figures=0")  # the scores only
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((run / "results.json").read_text())
  trained = json.loads((trained_run[0] / "results.json").read_text())
  trained = trained.get("targets", {}).get("demo", trained)
  for name in ("demo", "custom"):
    block = results["targets"][name]
    assert block["num_query"] == trained["num_query"] and block["num_gallery"] == trained["num_gallery"], name
    # Another image order puts images in other eval batches, whose features agree only to float rounding.
    assert block["rank1"] == pytest.approx(trained["rank1"], rel=1e-4), name
    assert block["mAP"] == pytest.approx(trained["mAP"], rel=1e-4), name
  assert results["per_query_file"] == "per_query_final_demo.npz" and (run / "per_query_final_demo.npz").exists()


def test_maps_mode_and_trained_maps_differ_from_untrained(demo_run):
  workdir, data, _ = demo_run
  done = run_py("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "maps", "--num_images=3",
              "--query_position=1,0", f"--config.data.root={data}", *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (workdir / "maps_query.png").stat().st_size > 1000
  bad = run_py("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "maps", "--query_position=1",
             f"--config.data.root={data}", *TINY)
  assert bad.returncode == 1 and "--query_position=1: expected row,col" in bad.stderr
  from laga_jax.evaluation import maps
  config = demo.get_config()
  config.data.root = str(data)
  config.update_from_flattened_dict({"data.image_size": (32, 16), "model.width": 8, "model.reduction_dim": 16})
  _, model, variables, _, _ = trainer.load_trained_model(config, workdir, mode="maps")
  images = jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 32, 16, 3)), jax.numpy.float32)
  trained = maps.compute_maps(model, variables, images)
  fresh = jax.jit(lambda r: model.init(r, images[:1], train=False))(jax.random.PRNGKey(3))
  untrained = maps.compute_maps(model, {"params": fresh["params"], "batch_stats": fresh["batch_stats"]}, images)
  # One map per layer4 copy, two per SAM-RPE module (query position, mean), one per CAM module.
  assert sorted(k.split(":")[0] for k in trained) == ["act"] * 4 + ["cam"] * 2 + ["sam"] * 4
  for key, value in trained.items():
    assert value.shape[0] == 2 and value.ndim == 3, key
    assert not np.allclose(value, untrained[key], rtol=1e-3), key


def test_compare_reuses_a_finished_run(trained_run, tmp_path):
  """The comparison runner on a finished workdir: no retraining, its numbers, the three files."""
  from laga_jax import compare
  workdir, data, _ = trained_run
  shutil.copytree(workdir, tmp_path / "laga")
  overrides = ["data.root=" + str(data), *(arg.removeprefix("--config.") for arg in TINY)]
  summary = compare.compare(["configs/demo.py"], str(tmp_path), overrides=overrides)
  first = json.loads((workdir / "results.json").read_text())
  row = summary["models"][0]
  assert row["label"] == "laga" and row["metrics"]["mAP"] == pytest.approx(first["mAP"])
  # Reused as it was: neither trained nor evaluated again.
  assert (tmp_path / "laga" / "results.json").read_text() == (workdir / "results.json").read_text()
  assert row["gflops"] > 0 and row["params"] > 0 and row["extract_images_per_second"] > 0
  for name in ("comparison.md", "comparison.json", "comparison.png"):
    assert (tmp_path / name).stat().st_size > 100, name
  pairs = compare.query_by_query({"a": {"paths": ["x", "y", "z"], "first_rank": np.array([0, 3, 0])},
                                  "b": {"paths": ["x", "y", "z"], "first_rank": np.array([0, 0, 5])}})
  assert pairs == [{"model": "b", "versus": "a", "only_model": 1, "only_versus": 1, "both": 1, "neither": 0,
                    "num_queries": 3}]


def test_search_mode(demo_run):
  workdir, data, _ = demo_run
  query_dir = data / "query"
  query = sorted(query_dir.glob("*.jpg"))[0]
  done = run_py("--config", "configs/demo.py", "--workdir", str(workdir), "--mode", "search",
              f"--query={query}", f"--gallery_dir={data / 'bounding_box_test'}", "--topk=5",
              *TINY)
  assert done.returncode == 0, done.stderr[-3000:]
  matches = json.loads((workdir / "search_results.json").read_text())["matches"]
  assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
  sims = [m["cosine_similarity"] for m in matches]
  assert sims == sorted(sims, reverse=True)


def test_unknown_config_key_is_named(tmp_path):
  done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.widht=8")
  assert done.returncode != 0
  assert "widht" in done.stderr


def test_bad_value_is_named(tmp_path):
  done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.rpe=diag")
  assert done.returncode != 0
  assert "--config.model.rpe='diag'" in done.stderr


def test_missing_dataset_folder_is_named(tmp_path):
  done = run_py("--config", "configs/market.py", "--workdir", str(tmp_path),
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
  """Stopped after 4 of 6 steps (mid-epoch) and resumed == 6 steps uninterrupted, bit for bit; the later runs
  in this process reuse the first one's traced and compiled train step."""
  data = tmp_path / "data"
  trainer.train_and_evaluate(_tiny_config(data), str(tmp_path / "straight"))
  exp = trainer.setup(_tiny_config(data), str(tmp_path / "probe"))
  step_fn, _ = trainer._compiled_steps(exp.data_parallel, exp.config.loss)
  traced = step_fn._cache_size()
  trainer.train_and_evaluate(_tiny_config(data, max_steps=4), str(tmp_path / "resumed"))
  assert exp.num_classes == NUM_DEMO_IDS
  target = trainer.create_state(exp).checkpoint_tree()
  stopped, meta = _final_params(tmp_path / "resumed", _tiny_config(data), target)
  assert int(stopped["step"]) == 4 and meta["epoch"] == 1
  trainer.train_and_evaluate(_tiny_config(data), str(tmp_path / "resumed"))
  assert step_fn._cache_size() == traced >= 1  # the same model and optimiser objects: no new trace
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
