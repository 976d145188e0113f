"""Multi-process training and evaluation on JAX's distributed runtime, on this machine (docs/distributed.md).

Two `run.py` processes on 127.0.0.1, one CPU device each (gloo collectives), train and evaluate a tiny
model (LAGA-Net's global branch) as one job; they must end with the parameters, BatchNorm statistics, losses
and `results.json` of one process with two devices and the same global batch, for `shard_map` and `pmap`.
A SIGTERM mid-run (what SLURM and Kubernetes send) stops every process at one step with a checkpoint and exit
code 75, and the same command then resumes to the uninterrupted run's parameters, one- and two-process. Every
process is bounded in time and killed if it outlives it.
"""

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import run_py_env
from laga_jax import checkpoint as checkpoint_lib
from laga_jax import safeguards

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 6, 2
TOTAL = STEPS_PER_EPOCH * EPOCHS
# The demo's global-branch model (Table III's first row: the ResNet with its BatchNorm, CE + triplet heads) at
# 64×32 and width 8, P×K = 4×2 (4 images per process), two epochs with a checkpoint at the first epoch's end,
# evaluated without figures. What these jobs check is the distributed runtime (process slices of each global
# batch, collectives across processes, preemption, resume), which no model-specific layer takes part in; the
# full LAGA-Net's cross-device numerics (four layer4 copies' BatchNorm, six heads) are checked in one process
# by test_train.py's data-parallel tests, and its one-process run.py jobs by test_run.py. The full model
# would cost each of these ten processes half as much CPU again (one process, idle: 52 against 34 CPU s).
TINY = ["--config", "configs/demo.py:global", "--config.data.image_size=(64,32)", "--config.data.resize_size=(72,36)",
        "--config.model.width=8", "--config.model.reduction_dim=32", "--config.data.p=4", "--config.data.k=2",
        f"--config.train.steps_per_epoch={STEPS_PER_EPOCH}", f"--config.train.num_epochs={EPOCHS}",
        "--config.train.log_every_steps=2", "--config.optim.warmup_epochs=0", "--config.optim.decay_epochs=(1,)",
        "--config.eval.batch_size=32", "--config.eval.evaluate_untrained=False", "--config.eval.num_figures=0"]
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: pathlib.Path, data: pathlib.Path, *, processes: int, parallel: str = "shard_map",
           port: int = 0) -> list:
  """Popen of each process of the job (one process: two forced CPU devices; two: one device each)."""
  args = [sys.executable, str(ROOT / "run.py"), *TINY, "--workdir", str(workdir), f"--config.data.root={data}",
          f"--config.train.parallel={parallel}"]
  if processes == 1:
    return [subprocess.Popen(args, cwd=ROOT, env=run_py_env(devices=2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  env = run_py_env()
  job = ["--config.train.distributed=True", f"--config.train.coordinator_address=127.0.0.1:{port}",
         f"--config.train.num_processes={processes}", "--config.train.initialization_timeout=120"]
  return [subprocess.Popen(args + job + [f"--config.train.process_id={i}"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _finish(procs: list, deadline: float) -> list:
  """(returncode, stdout, stderr) of each process; all are killed once the deadline has passed."""
  out = []
  for proc in procs:
    try:
      stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for other in procs:
        other.kill()
      stdout, stderr = proc.communicate()
      raise AssertionError(f"a process outlived its {TIMEOUT} s: {stderr[-2000:]}")
    out.append((proc.returncode, stdout, stderr))
  return out


def _run(workdir, data, **kwargs) -> list:
  done = _finish(_start(workdir, data, port=_free_port(), **kwargs), time.monotonic() + TIMEOUT)
  for code, _, stderr in done:
    assert code == 0, stderr[-3000:]
  return done


def _terminated(workdir: pathlib.Path, data, *, signal_process: int, **kwargs) -> list:
  """Start the job, send SIGTERM to one of its processes once training is under way, collect the exits."""
  procs = _start(workdir, data, port=_free_port(), **kwargs)
  deadline = time.monotonic() + TIMEOUT
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and metrics.read_text().strip()):  # the first log line: step 2
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError(f"the run ended or hung before training: {procs[0].communicate()[1][-3000:]}")
    time.sleep(0.05)
  procs[signal_process].send_signal(signal.SIGTERM)
  return _finish(procs, deadline)


def _state(workdir: pathlib.Path) -> dict:
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), {}, keep=1)
  try:
    step = checkpointer.latest_step()
    return dict(checkpointer.restore_raw(step), saved_step=step)
  finally:
    checkpointer.close()


def _worst_relative(a, b) -> float:
  """The largest max|a - b| / max|b| over the arrays of two trees (each tensor at its own scale)."""
  worst = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)))
  return worst


def _losses(workdir: pathlib.Path) -> dict:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  state, ref = _state(workdir), _state(reference)
  assert state["saved_step"] == ref["saved_step"] == TOTAL
  assert _worst_relative(state["params"], ref["params"]) <= 1e-4
  assert _worst_relative(state["batch_stats"], ref["batch_stats"]) <= 1e-4
  losses, ref_losses = _losses(workdir), _losses(reference)
  assert sorted(losses) == sorted(ref_losses) == list(range(2, TOTAL + 1, 2))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)],
                             rtol=1e-5)
  results, ref_results = (json.loads((w / "results.json").read_text()) for w in (workdir, reference))
  for key in ("rank1", "rank5", "mAP", "mINP", "num_query", "num_gallery"):
    assert results[key] == pytest.approx(ref_results[key], abs=1e-6), key


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
  """The demo data (generated here, so that jobs started together never race to write it)."""
  from data_pipelines import demo
  return demo.generate_demo_dataset(tmp_path_factory.mktemp("distributed_data") / "demo")


@pytest.fixture(scope="module")
def references(tmp_path_factory, data):
  """parallel mode -> the workdir of one process with two devices: the run every multi-process variant of
  that mode must reproduce. Both are made on first use, at the same time (each compiles on one core)."""
  made = {}

  def reference(parallel: str) -> pathlib.Path:
    if not made:
      workdirs = {mode: tmp_path_factory.mktemp(f"one_process_{mode}") / "run" for mode in ("shard_map", "pmap")}
      procs = {mode: _start(w, data, processes=1, parallel=mode) for mode, w in workdirs.items()}
      deadline = time.monotonic() + TIMEOUT
      for mode, workdir in workdirs.items():
        (code, _, stderr), = _finish(procs[mode], deadline)
        assert code == 0, stderr[-3000:]
        made[mode] = workdir
    return made[parallel]
  return reference


def test_sigterm_stops_two_processes_at_one_step_and_the_rerun_equals_one_process(tmp_path, references):
  """Two processes (shard_map) on a fresh data folder, which process 0 generates while process 1 waits;
  SIGTERM to process 1 mid-run; the same command again; then the same as one process with two devices
  (on the same, deterministically generated, data), uninterrupted."""
  workdir, data = tmp_path / "run", tmp_path / "demo"
  done = _terminated(workdir, data, processes=2, signal_process=1)
  for code, _, stderr in done:
    assert code == safeguards.EXIT_PREEMPTED, stderr[-3000:]
  saved = _state(workdir)["saved_step"]
  assert 2 <= saved < TOTAL
  line = done[0][2].strip().splitlines()[-1]
  assert line.startswith("error: preempted (SIGTERM) on all 2 processes: saved") and \
      f"checkpoints/{saved} (step {saved})" in line, line
  assert not (workdir / "results.json").exists()
  done = _run(workdir, data, processes=2)  # the same command again
  _assert_same_run(workdir, references("shard_map"))
  # One voice per job: process 0 reports and writes; process 1 only says that it joined.
  (_, out0, err0), (_, out1, err1) = done
  assert "process 0 of 2: 1 local / 2 global devices" in err0 and "process 1 of 2" in err1
  assert "rank-1" in out0 and "rank-1" not in out1 and "train:" in err0 and "train:" not in err1


def test_two_processes_with_pmap_equal_one_process_with_two_devices(tmp_path, data, references):
  workdir = tmp_path / "run"
  _run(workdir, data, processes=2, parallel="pmap")
  _assert_same_run(workdir, references("pmap"))


def test_sigterm_one_process_saves_and_the_rerun_resumes(tmp_path, data, references):
  workdir = tmp_path / "run"
  (code, _, stderr), = _terminated(workdir, data, processes=1, signal_process=0)
  assert code == safeguards.EXIT_PREEMPTED, stderr[-3000:]
  saved = _state(workdir)["saved_step"]
  assert 2 <= saved < TOTAL
  assert stderr.strip().splitlines()[-1].startswith(f"error: preempted (SIGTERM): saved {workdir}/checkpoints/{saved}")
  _run(workdir, data, processes=1)
  _assert_same_run(workdir, references("shard_map"))
