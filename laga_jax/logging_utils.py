"""Progress (tqdm on a terminal, plain periodic lines in a log file) and the metric writer.

The metric writer appends JSON lines to `<workdir>/metrics.jsonl` and writes the same scalars, and the
run's pictures (ranked results, attention maps), to TensorBoard with flax's `SummaryWriter`.
"""

import json
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, TextIO, Union

import numpy as np

PLAIN_INTERVAL_SECONDS = 30.0  # a plain progress line at most this often when the stream is not a terminal


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def is_terminal(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class Progress:
  """Progress over `total` units: a tqdm bar when `stream` is a terminal, else one plain line every
  `interval` seconds and at the end (a log file gets readable lines, not an endless `\\r` line).

  The rate ignores the first `warmup` updates, so that compilation does not distort it or the ETA.
  """

  def __init__(self, total: int, *, desc: str = "", unit: str = "it", initial: int = 0, warmup: int = 1,
               stream: Optional[TextIO] = None, interval: float = PLAIN_INTERVAL_SECONDS,
               interactive: Optional[bool] = None, enabled: bool = True):
    self.total, self.count, self.desc, self.unit = int(total), int(initial), desc, unit
    self.stream = sys.stderr if stream is None else stream
    if not enabled:  # e.g. the processes other than 0 of a multi-process job: one bar per job, not N
      self.stream, interactive, interval = open(os.devnull, "w"), False, float("inf")
    self.warmup, self.interval = warmup, interval
    self._start = time.perf_counter()
    self._rate_start: Optional[float] = None
    self._rate_from = self.count
    self._last_line = self._start
    self._closed = False
    self.postfix = ""
    self._bar = None
    if is_terminal(self.stream) if interactive is None else interactive:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=self.total, initial=self.count, desc=desc or None, unit=unit, file=self.stream,
                       dynamic_ncols=True, smoothing=0.1, leave=True)

  def update(self, n: int = 1, postfix: Optional[Mapping[str, float]] = None) -> None:
    self.count += n
    if self._rate_start is None and self.count - self._rate_from >= self.warmup:
      self._rate_start, self._rate_from = time.perf_counter(), self.count
    if postfix:
      self.postfix = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix_str(self.postfix, refresh=False)
      if n:
        self._bar.update(n)
    else:
      now = time.perf_counter()
      if n and (now - self._last_line >= self.interval or self.count >= self.total):
        self._last_line = now
        self.stream.write(self.render() + "\n")
        self.stream.flush()
    if self.count >= self.total:
      self.close()

  def rate(self) -> float:
    """Units per second since the warm-up; 0 before."""
    if self._rate_start is None:
      return 0.0
    elapsed = time.perf_counter() - self._rate_start
    return (self.count - self._rate_from) / elapsed if elapsed > 0 else 0.0

  def _rate_text(self) -> str:
    return f"{self.rate():.2f} {self.unit}/s"

  def render(self) -> str:
    frac = min(self.count / max(self.total, 1), 1.0)
    rate = self.rate()
    eta = _format_seconds((self.total - self.count) / rate) if rate > 0 else "--:--"
    head = f"{self.desc}: " if self.desc else ""
    return (f"{head}{self.count}/{self.total} ({100 * frac:.1f}%) {self._rate_text()} "
            f"elapsed {_format_seconds(time.perf_counter() - self._start)} eta {eta} {self.postfix}").rstrip()

  def close(self) -> None:
    if not self._closed and self._bar is not None:
      self._bar.close()
    self._closed = True


class ProgressBar(Progress):
  """Training progress in steps, with images/s (`images_per_step` per step) and the latest metrics."""

  def __init__(self, total: int, *, images_per_step: int, initial: int = 0, warmup: int = 1,
               stream: Optional[TextIO] = None, interval: float = PLAIN_INTERVAL_SECONDS,
               interactive: Optional[bool] = None, enabled: bool = True):
    self.images_per_step = images_per_step
    super().__init__(total, desc="train", unit="step", initial=initial, warmup=warmup, stream=stream,
                     interval=interval, interactive=interactive, enabled=enabled)

  def steps_per_second(self) -> float:
    return self.rate()

  def _rate_text(self) -> str:
    return f"{self.rate() * self.images_per_step:.1f} img/s"


def progress_iter(iterable: Iterable, *, total: int, desc: str = "", unit: str = "it",
                  stream: Optional[TextIO] = None) -> Iterator:
  """`iterable` with a `Progress` over `total` items."""
  progress = Progress(total, desc=desc, unit=unit, stream=stream, warmup=0)
  try:
    for item in iterable:
      yield item
      progress.update(1)
  finally:
    progress.close()


def _read_image(image: Union[str, os.PathLike, np.ndarray]) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image
    with Image.open(image) as opened:
      return np.asarray(opened.convert("RGB"))
  return np.asarray(image)


class MetricWriter:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tensorboard`), on process 0.

  A resumed run repeats the steps after its last checkpoint; the first write of this writer therefore drops
  the earlier records at or after its step, so every step appears once in `metrics.jsonl`.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._first_write = True
    if not enabled:
      return
    self.root = pathlib.Path(workdir)
    self.root.mkdir(parents=True, exist_ok=True)
    self.path = self.root / "metrics.jsonl"
    if tensorboard:
      from flax.metrics import tensorboard as flax_tensorboard
      self._tb = flax_tensorboard.SummaryWriter(str(self.root / "tensorboard"), auto_flush=False)

  def _drop_from(self, step: int) -> None:
    """Remove the records with step >= `step` left by an earlier run of this workdir."""
    if not self.path.exists():
      return
    kept, dropped = [], 0
    for line in self.path.read_text(encoding="utf-8").splitlines():
      try:
        record_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if record_step >= step:
        dropped += 1
      else:
        kept.append(line)
    if dropped:
      scratch = self.path.with_name(self.path.name + ".tmp")
      scratch.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
      os.replace(scratch, self.path)

  def write(self, step: int, scalars: Mapping[str, float], **extra) -> None:
    if not self.enabled:
      return
    if self._first_write:
      self._first_write = False
      self._drop_from(int(step))
    if self._jsonl is None:
      self._jsonl = open(self.path, "a", encoding="utf-8")
    record = {"step": int(step), "time": time.time(), **extra, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.scalar(key, float(value), int(step))
      self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, Union[str, os.PathLike, np.ndarray]]) -> None:
    """Pictures (PNG paths or uint8 (H, W, 3) arrays) to TensorBoard's Images tab under their names."""
    if not self.enabled or self._tb is None:
      return
    for name, image in images.items():
      if image is None or (isinstance(image, (str, os.PathLike)) and not os.path.isfile(image)):
        continue
      self._tb.image(name, _read_image(image), int(step), max_outputs=1)
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def result_figures(results: Mapping[str, Any]) -> dict:
  """{TensorBoard name: PNG path} of the pictures an evaluation wrote (ranked results, maps), per target."""
  found = {}
  blocks = [("", results)] + [(f"{name}/", block) for name, block in (results.get("targets") or {}).items()]
  for prefix, block in blocks:
    for key, name in (("figure", "ranked_results"), ("maps_figure", "maps")):
      if isinstance(block, Mapping) and block.get(key):
        found.setdefault(str(block[key]), f"{prefix}{name}")
  return {name: path for path, name in found.items()}
