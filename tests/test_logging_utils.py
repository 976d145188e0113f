"""Progress output (tqdm on a terminal, plain lines in a log) and the metric writer (JSON lines, TensorBoard)."""

import io
import json

import numpy as np
from PIL import Image

from laga_jax import logging_utils


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_in_a_log_file_is_plain_lines():
  stream = io.StringIO()
  bar = logging_utils.ProgressBar(5, images_per_step=20, stream=stream, interval=0.0)
  for step in range(5):
    bar.update(1, {"loss": 1.0 / (step + 1)} if step == 2 else None)
  text = stream.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 5 and lines[-1].startswith("train: 5/5 (100.0%)") and "img/s" in lines[-1]
  assert "loss=0.3333" in lines[-1]
  assert bar.steps_per_second() > 0


def test_progress_waits_between_plain_lines():
  stream = io.StringIO()
  bar = logging_utils.Progress(100, desc="features", stream=stream, interval=3600.0)
  for _ in range(100):
    bar.update(1)
  assert stream.getvalue().splitlines() == [stream.getvalue().splitlines()[-1]]  # only the final line
  assert "features: 100/100" in stream.getvalue()


def test_progress_on_a_terminal_uses_tqdm():
  stream = _Terminal()
  items = list(logging_utils.progress_iter(range(7), total=7, desc="x", stream=stream))
  assert items == list(range(7))
  bar = logging_utils.ProgressBar(3, images_per_step=4, stream=stream)
  bar.update(3)
  assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_metrics_jsonl_has_each_step_once_after_a_resume(tmp_path):
  writer = logging_utils.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (10, 20, 30, 40):
    writer.write(step, {"loss": float(step)})
  writer.write(40, {"val_accuracy": 0.5})
  writer.close()
  # Resumed from the checkpoint at step 20: steps 30 and 40 are trained (and logged) again.
  writer = logging_utils.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(30, {"loss": 3.5})
  writer.write(40, {"loss": 4.5})
  writer.write(40, {"val_accuracy": 0.6})
  writer.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r.get("loss", r.get("val_accuracy"))) for r in records] == [
      (10, 10.0), (20, 20.0), (30, 3.5), (40, 4.5), (40, 0.6)]


def test_scalars_and_pictures_reach_tensorboard(tmp_path):
  import tensorflow as tf
  picture = tmp_path / "ranked.png"
  Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(picture)
  writer = logging_utils.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": 1.5})
  writer.write_images(5, {"ranked_results": str(picture), "missing": str(tmp_path / "none.png")})
  writer.close()
  tags = {}
  for event_file in (tmp_path / "tensorboard").glob("events.*"):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        tags[value.tag] = event.step
  assert tags == {"loss": 5, "ranked_results": 5}


def test_result_figures_names_every_picture():
  results = {"figure": "a.png", "maps_figure": "m.png",
             "targets": {"demo": {"figure": "a.png"}, "demo_b": {"figure": "b.png", "maps_figure": "mb.png"}}}
  assert logging_utils.result_figures(results) == {"ranked_results": "a.png", "maps": "m.png",
                                                   "demo_b/ranked_results": "b.png", "demo_b/maps": "mb.png"}
