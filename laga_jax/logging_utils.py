"""Progress bar with ETA and images/s, and a metric writer (JSON lines + TensorBoard scalars)."""

import json
import pathlib
import sys
import time
from typing import Mapping, Optional, TextIO


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
  """A one-line progress bar: steps, percentage, images/s, elapsed and ETA, plus the latest metrics.

  Throughput ignores the first `warmup` updates so that compilation does not distort images/s and ETA.
  """

  def __init__(self, total: int, *, images_per_step: int, initial: int = 0, warmup: int = 1,
               stream: TextIO = sys.stderr, width: int = 24, min_interval: float = 0.5):
    self.total, self.images_per_step, self.stream, self.width = total, images_per_step, stream, width
    self.count, self.warmup, self.min_interval = initial, warmup, min_interval
    self._start = time.perf_counter()
    self._rate_start: Optional[float] = None
    self._rate_from = initial
    self._last_draw = 0.0
    self.postfix = ""

  def update(self, n: int = 1, postfix: Optional[Mapping[str, float]] = None) -> None:
    self.count += n
    if self._rate_start is None and self.count - self._rate_from >= self.warmup:
      self._rate_start, self._rate_from = time.perf_counter(), self.count
    if postfix:
      self.postfix = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
    now = time.perf_counter()
    if now - self._last_draw >= self.min_interval or self.count >= self.total:
      self._last_draw = now
      self.stream.write("\r" + self.render() + ("\n" if self.count >= self.total else ""))
      self.stream.flush()

  def steps_per_second(self) -> float:
    if self._rate_start is None:
      return 0.0
    elapsed = time.perf_counter() - self._rate_start
    return (self.count - self._rate_from) / elapsed if elapsed > 0 else 0.0

  def render(self) -> str:
    frac = min(self.count / max(self.total, 1), 1.0)
    filled = int(round(frac * self.width))
    rate = self.steps_per_second()
    eta = (self.total - self.count) / rate if rate > 0 else float("nan")
    eta_text = _format_seconds(eta) if rate > 0 else "--:--"
    return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} {100 * frac:5.1f}% "
            f"{rate * self.images_per_step:7.1f} img/s elapsed {_format_seconds(time.perf_counter() - self._start)}"
            f" eta {eta_text} {self.postfix}")


class MetricWriter:
  """Scalars to `<workdir>/metrics.jsonl` and to TensorBoard (`<workdir>/tensorboard`) on process 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(root / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      import tensorflow as tf  # The input pipeline already imports TF; summaries need nothing else.
      self._tb = tf.summary.create_file_writer(str(root / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], **extra) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time(), **extra, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      import tensorflow as tf
      with self._tb.as_default():
        for key, value in scalars.items():
          tf.summary.scalar(key, float(value), step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
