"""Every failure of a run ends in one clear line: the training loop's stops (non-finite loss, Ctrl-C, a
damaged checkpoint to resume from) and run.py's command-line failures (bad images, a busy workdir, search
without a checkpoint, unknown config keys, out-of-range values, a full disk)."""

import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from conftest import run_py
from configs import demo
from laga_jax import checkpoint as checkpoint_lib
from laga_jax import cli_errors, safeguards, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _one_error_line(done):
  assert done.returncode != 0
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, done.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
  from data_pipelines import demo as demo_data
  return demo_data.generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train_ids=6,
                                         num_test_ids=3, images_per_id_per_cam=1, num_cams=3, num_distractors=2,
                                         num_junk=1, height=32, width=16)


@pytest.fixture(autouse=True)
def _image_cache_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("LAGA_CACHE_DIR", str(tmp_path / "cache"))


# --- the training loop, with a stand-in step (no compilation: these test the loop, not the model) ---------

def _config(root, **train):
  config = demo.get_config()
  config.data.root = str(root)
  config.data.image_size, config.data.resize_size = (32, 16), (36, 18)
  config.model.width, config.model.reduction_dim = 8, 16
  config.data.p, config.data.k = 3, 2
  config.train.num_epochs, config.train.steps_per_epoch = 3, 3
  config.train.num_devices, config.train.log_every_steps, config.train.keep_checkpoints = 1, 100, 2
  config.eval.evaluate_untrained = False
  config.mode = "train"
  config.update_from_flattened_dict({f"train.{k}": v for k, v in train.items()})
  return config


@pytest.fixture
def fake_steps(monkeypatch):
  """Replace the compiled train step by one that only counts, and the model's variables by a few small arrays
  (no model compilation); `losses[i]` is the loss of step i + 1."""
  calls = {"losses": [], "on_step": None}
  variables = {"params": {"backbone": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 4))}},
               "batch_stats": {"backbone": {"mean": jnp.zeros(2)}}}
  monkeypatch.setattr(trainer, "initial_variables", lambda exp, rng: variables)

  def step_fn(state, batch):
    step = int(state.step) + 1
    if calls["on_step"]:
      calls["on_step"](step)
    loss = calls["losses"][step - 1] if step <= len(calls["losses"]) else 1.0
    metrics = {"loss": jnp.float32(loss), "finite": jnp.float32(jnp.isfinite(loss)), "accuracy": jnp.float32(0)}
    return state.replace(step=state.step + 1), metrics

  monkeypatch.setattr(trainer, "_compiled_steps", lambda dp, loss_cfg: (step_fn, None))
  return calls


def test_non_finite_loss_stops_at_its_step_naming_the_last_checkpoint(demo_root, tmp_path, fake_steps):
  fake_steps["losses"] = [2.0, 1.9, 1.8, 1.7, 1.6e13, float("inf"), float("nan")]
  with pytest.raises(safeguards.NonFiniteLossError) as info:
    trainer.train_and_evaluate(_config(demo_root), str(tmp_path))
  message = str(info.value)
  assert message.startswith("non-finite loss (inf) at step 6 (epoch 1)"), message
  assert f"last good checkpoint: {tmp_path / 'checkpoints' / '3'} (step 3)" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]  # nothing saved after it


def test_ctrl_c_finishes_the_step_saves_and_says_where(demo_root, tmp_path, fake_steps):
  def press_ctrl_c(step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGINT)
      deadline = time.monotonic() + 30
      while not safeguards.stop_requested() and time.monotonic() < deadline:
        time.sleep(0.01)

  fake_steps["on_step"] = press_ctrl_c
  fake_steps["losses"] = [float(i) for i in range(1, 10)]
  handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(safeguards.TrainingInterrupted) as info:
    trainer.train_and_evaluate(_config(demo_root), str(tmp_path))
  assert signal.getsignal(signal.SIGINT) is handler
  assert str(info.value) == (f"interrupted by Ctrl-C: saved {tmp_path / 'checkpoints' / '5'} (step 5) of 9; "
                             "run the same command to resume")
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), {}, keep=2)
  assert ckpt.latest_step() == 5 and ckpt.read_meta()["epoch"] == 1
  ckpt.close()
  fake_steps["on_step"] = None
  trainer.train_and_evaluate(_config(demo_root), str(tmp_path))  # resumes at step 5 and finishes
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "9"]
  # The line at step 6 averages steps 4-6, as without the interruption: steps 4 and 5 came with the checkpoint.
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {m["step"]: m["loss"] for m in lines if "loss" in m} == {3: 2.0, 6: 5.0, 9: 8.0}


def test_resume_past_a_damaged_checkpoint(demo_root, tmp_path, fake_steps, caplog):
  trainer.train_and_evaluate(_config(demo_root, num_epochs=2), str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6" / "state")
  checkpoint_lib._WARNED.clear()
  with caplog.at_level(logging.WARNING, logger="laga_jax"):
    trainer.train_and_evaluate(_config(demo_root, num_epochs=3), str(tmp_path))
  assert (f"checkpoint {tmp_path / 'checkpoints' / '6'} is damaged (its state/ folder is missing): left in "
          f"place, continuing from {tmp_path / 'checkpoints' / '3'}") in caplog.text
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6", "6.damaged", "9"]


# --- run.py: one line each ---------------------------------------------------------------------------------

def test_bad_images_stop_before_training_naming_every_file(demo_root, tmp_path):
  root = tmp_path / "demo"
  shutil.copytree(demo_root, root)
  gallery = sorted((root / "bounding_box_test").glob("0*.jpg"))
  gallery[0].write_bytes(gallery[0].read_bytes()[:100])
  query = sorted((root / "query").glob("*.jpg"))
  query[0].unlink()
  os.symlink(root / "moved_away.jpg", query[0])
  done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), f"--config.data.root={root}")
  line = _one_error_line(done)
  assert line.startswith("error: 2 unreadable image(s) in dataset 'demo': "), line
  assert f"{gallery[0]} (truncated or corrupt" in line and f"{query[0]} (broken symbolic link" in line
  assert not (tmp_path / "w" / "checkpoints").exists() and not (tmp_path / "w" / "metrics.jsonl").exists()


def test_second_run_on_a_workdir_is_refused(demo_root, tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from laga_jax.workdir_lock import WorkdirLock\n"
       "with WorkdirLock(sys.argv[1]):\n  print('locked', flush=True); time.sleep(120)", str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  try:
    assert holder.stdout.readline().strip() == "locked"
    done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path), f"--config.data.root={demo_root}")
  finally:
    holder.kill()
    holder.wait()
  line = _one_error_line(done)
  assert f"workdir {tmp_path} is in use by another run (pid {holder.pid} on host" in line


def test_search_without_a_checkpoint_creates_nothing(demo_root, tmp_path):
  query = sorted((demo_root / "query").glob("*.jpg"))[0]
  done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path), "--mode", "search", f"--query={query}",
              f"--gallery_dir={demo_root / 'bounding_box_test'}")
  line = _one_error_line(done)
  assert "no checkpoint" in line
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, expected", [
    ("--config.train.nonexistent=1", "error: --config.train.nonexistent=1: config.train has no field "
                                     "'nonexistent' (fields: checkpoint_every_epochs,"),
    ("--config.trian.seed=3", "error: --config.trian.seed=3: config has no field 'trian' (did you mean 'train'?"),
    ("--config.train.seed=1.5", "error: flag --config.train.seed=1.5: invalid literal for int()"),
    ("--config.train.checkpoint_every_epochs=0", "error: --config.train.checkpoint_every_epochs=0: expected an "
                                                 "integer >= 1"),
])
def test_command_line_errors_are_one_line(tmp_path, flag, expected):
  done = run_py("--config", "configs/demo.py", "--workdir", str(tmp_path), flag)
  assert _one_error_line(done).startswith(expected), done.stderr[-2000:]
  assert not (tmp_path / "checkpoints").exists()


def test_messages_of_each_failure():
  full = checkpoint_lib.DiskFullError(errno.ENOSPC, "no space left on device while saving checkpoint 7 ...")
  assert cli_errors.describe(full) == ("no space left on device while saving checkpoint 7 ...", 1)
  results = OSError(errno.ENOSPC, "No space left on device", "/w/results.json")
  assert cli_errors.describe(results)[0] == ("no space left on device writing /w/results.json; free some space "
                                             "and rerun the same command to resume")
  assert cli_errors.describe(KeyboardInterrupt())[1] == cli_errors.EXIT_INTERRUPTED
  assert cli_errors.describe(safeguards.TrainingInterrupted("saved x"))[0] == "saved x"
  message, code = cli_errors.describe(TypeError("unsupported operand\nmore detail"))
  assert code == 1 and message == ("TypeError: unsupported operand more detail (an unexpected error: LAGA_DEBUG=1 "
                                   "shows the traceback)")
  with pytest.raises(SystemExit):
    cli_errors.report(ValueError("x"))
  os.environ["LAGA_DEBUG"] = "1"
  try:
    with pytest.raises(ValueError):
      cli_errors.report(ValueError("x"))
  finally:
    del os.environ["LAGA_DEBUG"]


def test_results_json_is_left_to_the_lock_holder(tmp_path):
  """The lock file names its owner for a human reading it too."""
  from laga_jax import workdir_lock
  with workdir_lock.WorkdirLock(str(tmp_path), command="run.py --config x"):
    owner = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
  assert owner["pid"] == os.getpid() and owner["command"] == "run.py --config x"
