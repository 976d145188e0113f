"""How a training run stops when something goes wrong: Ctrl-C, preemption (SIGTERM), a non-finite loss.

* `GracefulInterrupt`: the first Ctrl-C asks the loop to stop; it finishes the step in flight, saves a
  checkpoint, says where and exits (`TrainingInterrupted`). A second Ctrl-C exits at once, unsaved, without a
  traceback. A watcher thread reacts to the signal immediately, even while the main thread waits on a long
  compiled step, and the handler swallows the `KeyboardInterrupt` that would otherwise abandon a save half-way.
* Preemption: SIGTERM, what SLURM and Kubernetes send before they kill a job, saves at the next step boundary
  and exits with `EXIT_PREEMPTED` (`TrainingPreempted`); the same command resumes. In a `jax.distributed`
  job, JAX's preemption service catches SIGTERM on any process and every process stops at the same step
  (`multihost_utils.reached_preemption_sync_point`), so that the collective checkpoint is of one step; a
  Ctrl-C there is passed on as a SIGTERM to its own process.
* `FiniteGuard`: stops at the first step whose loss is not finite, naming that step (not the end of the
  logging window) and the last good checkpoint, before anything is saved. It reads each step's flag one step
  late, so the device keeps a step queued.
"""

import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

log = logging.getLogger("laga_jax")

EXIT_INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C (128 + SIGINT)
# Preempted and saved: EX_TEMPFAIL of sysexits.h ("temporary failure; retry"), distinct from a crash (1), a
# Ctrl-C (130) and a kill (137, 143), so a scheduler's retry policy can requeue on exactly this code.
EXIT_PREEMPTED = 75


class TrainingInterrupted(Exception):
  """Ctrl-C: the run saved a checkpoint and stopped; the message says where and how to resume."""


class TrainingPreempted(TrainingInterrupted):
  """SIGTERM: the run (every process of it) saved a checkpoint at one step and stopped; rerun to resume."""


class NonFiniteLossError(FloatingPointError):
  """The loss of a step was NaN or infinite; nothing after the last good checkpoint was saved."""


class GracefulInterrupt:
  """`with GracefulInterrupt() as stop:` ... `if stop.requested: save and raise TrainingInterrupted`.

  Outside the main thread (where Python cannot handle signals) it does nothing and `requested` stays False.
  """

  def __init__(self, message: str = "finishing the current step, then saving a checkpoint and stopping", *,
               handle_sigterm: bool = True, sigint_as_sigterm: bool = False):
    """`handle_sigterm`: a SIGTERM also asks the loop to stop, as a preemption (off where JAX's preemption
    service owns SIGTERM); `sigint_as_sigterm`: the first Ctrl-C is passed on as a SIGTERM to this process,
    so that the preemption service makes every process of the job stop at the same step."""
    self.message = message
    self.handle_sigterm = handle_sigterm
    self.sigint_as_sigterm = sigint_as_sigterm
    self._event = threading.Event()
    self._count = 0
    self._active = False
    self.reason: Optional[str] = None  # "interrupt" (Ctrl-C) or "preempt" (SIGTERM), once requested

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def _on_sigint(self) -> None:
    self._count += 1
    if self._count == 1:
      self.reason = self.reason or "interrupt"
      if self.sigint_as_sigterm:
        sys.stderr.write("\nCtrl-C: asking every process to save at the same step, then stopping (press Ctrl-C "
                         "again to quit at once, unsaved)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        return
      self._event.set()
      sys.stderr.write(f"\nCtrl-C: {self.message} (press Ctrl-C again to quit at once, unsaved)\n")
      sys.stderr.flush()
    else:
      sys.stderr.write("\nCtrl-C again: quitting now, without saving\n")
      sys.stderr.flush()
      os._exit(EXIT_INTERRUPTED)  # at once: no cleanup, no traceback, no waiting for the step

  def _on_sigterm(self) -> None:
    if self._event.is_set():
      return  # already stopping: a repeated notice changes nothing
    self.reason = "preempt"
    self._event.set()
    sys.stderr.write(f"\nSIGTERM (preemption): {self.message}\n")
    sys.stderr.flush()

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:  # the write end was closed: the context is over
        return
      for signum in data:
        if signum == signal.SIGINT:
          self._on_sigint()
        elif signum == signal.SIGTERM and self.handle_sigterm:
          self._on_sigterm()

  def __enter__(self) -> "GracefulInterrupt":
    if threading.current_thread() is not threading.main_thread():
      return self
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    # The C-level signal handler writes the signal number to this fd at once; the Python-level handler
    # below only runs when the main thread returns to Python (after a compiled step) and does nothing.
    self._previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
    if self.handle_sigterm:
      self._previous_term_handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, args=(self._read_fd,), name="ctrl-c-watcher", daemon=True)
    self._thread.start()
    self._active = True
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    if not self._active:
      return
    self._active = False
    _ACTIVE.remove(self)
    signal.set_wakeup_fd(self._previous_wakeup)
    signal.signal(signal.SIGINT, self._previous_handler)
    if self.handle_sigterm:
      signal.signal(signal.SIGTERM, self._previous_term_handler)
    os.close(self._write_fd)
    self._thread.join(timeout=5)
    os.close(self._read_fd)


class FiniteGuard:
  """Checks each step's `finite` metric (1.0 when the loss is finite) one step late.

  `after_step(step, epoch, metrics)` after every step; `flush()` before a checkpoint is written or metrics are
  logged, so that no state after a non-finite step is ever saved. `last_checkpoint()` names the checkpoint a
  rerun would resume from.
  """

  def __init__(self, last_checkpoint: Callable[[], Optional[str]]):
    self._last_checkpoint = last_checkpoint
    self._pending = None

  def after_step(self, step: int, epoch: int, metrics: dict) -> None:
    previous, self._pending = self._pending, (step, epoch, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(*pending)

  def _check(self, step: int, epoch: int, metrics: dict) -> None:
    import jax
    import numpy as np

    finite = metrics.get("finite")
    if finite is None:
      finite = np.all(np.isfinite(jax.device_get(metrics["loss"])))
    if float(np.asarray(jax.device_get(finite)).mean()) >= 1.0:
      return
    loss = float(np.asarray(jax.device_get(metrics["loss"])).mean())
    last = self._last_checkpoint()
    where = (f"last good checkpoint: {last}. Lower --config.optim.lr (or check the data), then rerun: it resumes "
             "from that checkpoint") if last else ("no checkpoint yet. Lower --config.optim.lr (or check the "
                                                   "data), then rerun: it starts from scratch")
    raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step} (epoch {epoch}); stopped without saving; "
                             f"{where}")


_ACTIVE: list = []  # the GracefulInterrupt contexts entered (innermost last)


def stop_requested() -> bool:
  """True once Ctrl-C was pressed (or SIGTERM received) inside an active `GracefulInterrupt`."""
  return bool(_ACTIVE) and _ACTIVE[-1].requested


def interrupt_for_job() -> GracefulInterrupt:
  """The `GracefulInterrupt` for this process: in a `jax.distributed` job JAX's preemption service owns
  SIGTERM and a Ctrl-C is passed on to it; alone, this process handles both signals itself."""
  import jax
  in_job = jax.distributed.is_initialized()
  return GracefulInterrupt(handle_sigterm=not in_job, sigint_as_sigterm=in_job)


def stop_reason(step: int) -> Optional[str]:
  """Whether the loop stops after `step` (call once after every step): None, "interrupt" or "preempt".

  In a `jax.distributed` job the answer is the same on every process at the same step: JAX's preemption
  sync point, reached one step after the highest step any process was at when the notice came.
  """
  import jax
  if jax.distributed.is_initialized():
    from jax.experimental import multihost_utils
    if not multihost_utils.reached_preemption_sync_point(step):
      return None
    pressed = bool(_ACTIVE) and _ACTIVE[-1].reason == "interrupt"
    return "interrupt" if pressed else "preempt"
  if stop_requested():
    return _ACTIVE[-1].reason or "interrupt"
  return None


def last_checkpoint(checkpointer) -> Optional[str]:
  """'<workdir>/checkpoints/<step> (step <step>)' of the newest intact checkpoint, or None."""
  step = checkpointer.latest_step()
  return None if step is None else f"{checkpointer.root / 'checkpoints' / str(step)} (step {step})"
