"""Ctrl-C (first: stop after the step; second: quit at once), the non-finite loss guard, the workdir lock."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from laga_jax import safeguards, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- non-finite loss ---------------------------------------------------------------------------------------

def _metrics(loss):
  return {"loss": np.float32(loss), "finite": np.float32(np.isfinite(loss))}


def test_first_non_finite_step_is_named_with_the_last_checkpoint():
  guard = safeguards.FiniteGuard(lambda: "/w/checkpoints/20")
  losses = [2.0, 1.5, 1.6e13, np.inf, np.nan]
  with pytest.raises(safeguards.NonFiniteLossError) as info:
    for step, loss in enumerate(losses, start=19):
      guard.after_step(step, 1, _metrics(loss))
  message = str(info.value)
  assert message.startswith("non-finite loss (inf) at step 22 (epoch 1)"), message
  assert "last good checkpoint: /w/checkpoints/20" in message and "\n" not in message


def test_flush_checks_the_pending_step():
  guard = safeguards.FiniteGuard(lambda: None)
  guard.after_step(1, 0, _metrics(1.0))
  guard.after_step(2, 0, _metrics(np.nan))  # checked only at the next step or at flush
  with pytest.raises(safeguards.NonFiniteLossError, match=r"\(nan\) at step 2 .*no checkpoint yet\. .*it starts from scratch$"):
    guard.flush()
  guard.flush()  # nothing pending any more


# --- Ctrl-C ------------------------------------------------------------------------------------------------

_CTRL_C_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from laga_jax import safeguards
    with safeguards.GracefulInterrupt() as stop:
      print("ready", flush=True)
      while not stop.requested:
        time.sleep(0.01)
      print("stop requested; finishing the step and saving", flush=True)
      if sys.argv[1] == "twice":
        read_fd, _ = os.pipe()
        print("blocked", flush=True)
        os.read(read_fd, 1)  # blocks in C forever, like a long compiled step: only the watcher can end it
    print("saved and exited cleanly", flush=True)
""")


def _start(mode):
  process = subprocess.Popen([sys.executable, "-c", _CTRL_C_SCRIPT, mode], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert process.stdout.readline().strip() == "ready"
  return process


def test_first_ctrl_c_lets_the_loop_finish():
  process = _start("once")
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  assert process.returncode == 0, err
  assert "saved and exited cleanly" in out
  assert "Ctrl-C: finishing the current step" in err and "Traceback" not in err


def test_second_ctrl_c_quits_at_once_without_traceback():
  process = _start("twice")
  process.send_signal(signal.SIGINT)
  assert process.stdout.readline().startswith("stop requested")
  assert process.stdout.readline().strip() == "blocked"
  start = time.monotonic()
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  assert time.monotonic() - start < 10
  assert process.returncode == safeguards.EXIT_INTERRUPTED
  assert "quitting now, without saving" in err and "Traceback" not in err
  assert "saved and exited cleanly" not in out


def test_ctrl_c_handler_is_restored():
  before = signal.getsignal(signal.SIGINT)
  with safeguards.GracefulInterrupt():
    assert signal.getsignal(signal.SIGINT) is not before
  assert signal.getsignal(signal.SIGINT) is before


# --- workdir lock ------------------------------------------------------------------------------------------

def test_second_run_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from laga_jax.workdir_lock import WorkdirLock\n"
       "with WorkdirLock(sys.argv[1]):\n  print('locked', flush=True); time.sleep(60)", str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    message = str(info.value)
    assert f"pid {holder.pid} on host {os.uname().nodename}" in message and "\n" not in message
  finally:
    holder.kill()
    holder.wait()
  # Killed (SIGKILL: no clean-up): the lock it left is stale and is taken over.
  assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == holder.pid
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_stale_lock_is_taken_over_with_a_note(tmp_path, caplog):
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": 0}))
  with workdir_lock.WorkdirLock(str(tmp_path / "")):
    pass
  assert "taking over the lock left by a run that is no longer alive (pid 999999 on host elsewhere" in caplog.text


def test_same_process_cannot_hold_a_workdir_twice(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path / "w")):
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(str(tmp_path / "w")).acquire()
