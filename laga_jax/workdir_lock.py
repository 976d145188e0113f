"""One run per workdir: a lock file holding the owner's pid, host and start time.

Two runs on the same workdir would interleave `metrics.jsonl`, overwrite each other's `results.json` and
race on checkpoints. `WorkdirLock` takes an exclusive `flock` on `<workdir>/.lock` for the whole run; the
kernel releases it when the process ends however it ends (SIGKILL, a crash), so a lock left behind by a
dead process is detected (the file names an owner, but nobody holds the lock) and taken over with a note.
A second run while the first is alive is refused with one line naming the holder.
"""

import fcntl
import json
import logging
import os
import pathlib
import socket
import time
from typing import Optional

log = logging.getLogger("laga_jax")

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def _describe(owner: dict) -> str:
  started = owner.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"


def _read_owner(fd: int) -> Optional[dict]:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while chunk := os.read(fd, 4096):
    raw += chunk
  try:
    owner = json.loads(raw.decode())
  except (UnicodeDecodeError, ValueError):
    return None
  return owner if isinstance(owner, dict) else None


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds `workdir` for this process (created if missing)."""

  def __init__(self, workdir: str, *, command: str = "", process_id: int = 0):
    """`process_id`: in a multi-process job each process holds its own lock (`.lock`, `.lock.1`, ...), so
    that the job's processes share the workdir and a second job, or a second process 1, is refused."""
    self.workdir = pathlib.Path(workdir).absolute()
    self.path = self.workdir / (LOCK_NAME if process_id == 0 else f"{LOCK_NAME}.{process_id}")
    self.command = command
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = _read_owner(fd)
        os.close(fd)
        holder = _describe(owner) if owner else "another process"
        raise WorkdirBusyError(
            f"workdir {self.workdir} is in use by another run ({holder}); wait for it to finish, stop it, or "
            "use another --workdir") from None
      # The previous holder may have removed the file between our open and our lock: lock the file that is
      # there now, not an orphan.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    stale = _read_owner(fd)
    if stale:
      log.warning("workdir %s: taking over the lock left by a run that is no longer alive (%s)", self.workdir,
                  _describe(stale))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(owner) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still locked: a waiting process re-checks the inode and retries
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
