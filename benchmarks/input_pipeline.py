"""Training-input throughput: the tf.data body pipeline against a plain PIL/NumPy loop doing the same work.

Both decode Market-sized JPEGs (64x128, made by the demo generator), resize to 432x144 (bicubic), random-crop
384x128, flip, colour-jitter, normalise and random-erase, then stack P x K = 20 images per batch.

  python -m benchmarks.input_pipeline --out benchmarks/results/input_pipeline.json
"""

import argparse
import collections
import json
import os
import pathlib
import platform
import tempfile
import time
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
from PIL import Image

from configs import base
from data_pipelines import augment, demo, input_pipeline

Record = collections.namedtuple("Record", "path pid camid label")


def market_like_records(root: pathlib.Path, num_ids: int, seed: int) -> list:
  """Training records of a generated Market-layout set of `num_ids` identities (9 images each)."""
  demo.generate_demo_dataset(root, num_train_ids=num_ids, num_test_ids=1, num_distractors=0, num_junk=0, seed=seed)
  files = sorted((root / "bounding_box_train").glob("*.jpg"))
  pids = sorted({int(f.name[:4]) for f in files})
  label = {pid: i for i, pid in enumerate(pids)}
  return [Record(str(f), int(f.name[:4]), int(f.name[6]), label[int(f.name[:4])]) for f in files]


class NumpyAugment:
  """The body train transform with PIL and NumPy, one image at a time (what a torchvision loop does)."""

  def __init__(self, settings: augment.AugmentSettings, seed: int):
    self.s = settings
    self.rng = np.random.default_rng(seed)
    self.mean = np.array(augment.IMAGENET_MEAN, np.float32)
    self.std = np.array(augment.IMAGENET_STD, np.float32)

  def _jitter(self, x: np.ndarray) -> np.ndarray:
    gray = lambda im: im @ np.array([0.2989, 0.587, 0.114], np.float32)
    blend = lambda a, b, f: np.clip(f * a + (1 - f) * b, 0, 1)
    brightness, contrast, saturation, _ = self.s.color_jitter
    ops = [lambda im, f: blend(im, 0.0, f), lambda im, f: blend(im, gray(im).mean(), f),
           lambda im, f: blend(im, gray(im)[..., None], f)]
    for i in self.rng.permutation(3):
      strength = (brightness, contrast, saturation)[i]
      x = ops[i](x, self.rng.uniform(max(0, 1 - strength), 1 + strength))
    return x

  def _erase(self, x: np.ndarray) -> np.ndarray:
    if self.rng.random() >= self.s.erasing_p:
      return x
    height, width = x.shape[:2]
    for _ in range(augment.ERASING_ATTEMPTS):
      area = self.rng.uniform(*augment.ERASING_AREA) * height * width
      aspect = self.rng.uniform(*augment.ERASING_ASPECT)
      h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
      if h < height and w < width:
        top, left = self.rng.integers(0, height - h + 1), self.rng.integers(0, width - w + 1)
        x[top:top + h, left:left + w] = 0
        return x
    return x

  def __call__(self, path: str) -> np.ndarray:
    (rh, rw), (h, w) = self.s.resize_size, self.s.image_size
    image = Image.open(path).convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = self.rng.integers(0, rh - h + 1), self.rng.integers(0, rw - w + 1)
    image = image.crop((left, top, left + w, top + h))
    if self.rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = self._jitter(np.asarray(image, np.float32) / 255.0)
    return self._erase((x - self.mean) / self.std)


def numpy_batches(records: list, data_cfg, seed: int, num_steps: int) -> Iterator[dict]:
  """The same P x K plan as the tf.data pipeline, augmented image by image in this process."""
  transform = NumpyAugment(augment.AugmentSettings.from_config(data_cfg), seed)
  labels = np.array([r.label for r in records])
  plan = input_pipeline.pk_index_plan(labels, data_cfg.p, data_cfg.k, seed, 0, num_steps)
  for batch in plan:
    yield {"image": np.stack([transform(records[i].path) for i in batch]), "label": labels[batch]}


def images_per_second(batches: Iterator[dict], warmup: int, steps: int) -> float:
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  count = sum(len(next(batches)["label"]) for _ in range(steps))
  return count / (time.perf_counter() - start)


def decode_resize_batches(records: list, data_cfg, num_steps: int) -> Iterator[dict]:
  """Only decode + resize in tf.data: the host's share if crop/flip/jitter/erasing ran on the accelerator."""
  settings = augment.AugmentSettings.from_config(data_cfg)
  batch = data_cfg.p * data_cfg.k
  paths = [records[i % len(records)].path for i in range(num_steps * batch)]
  load = lambda path: augment.resize(augment.decode(tf.io.read_file(path)), settings.resize_size)
  dataset = tf.data.Dataset.from_tensor_slices(paths).map(load, tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch).map(lambda image: {"image": image, "label": tf.zeros([batch])})
  return dataset.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def run(data_dir: pathlib.Path, num_ids: int, steps: int, warmup: int, repeats: int, seed: int) -> list:
  """Median images/s of each pipeline over `repeats` interleaved runs (the machine may be shared)."""
  records = market_like_records(data_dir, num_ids, seed)
  data_cfg = base.get_config().data   # body: 432x144 -> 384x128, jitter, erasing 0.5, P x K = 5 x 4
  total = warmup + steps
  cached = data_cfg.copy_and_resolve_references()
  cached.cache_decoded = True
  decoded = input_pipeline.DecodedImages.from_paths([r.path for r in records])
  serial = data_cfg.copy_and_resolve_references()
  serial.num_parallel_calls = 1
  train = lambda cfg, **kw: input_pipeline.train_batches(records, cfg, seed=seed, epoch=0, num_steps=total, **kw)
  cases = {
      "tf.data: decode + augment (num_parallel_calls=-1)": lambda: train(data_cfg).as_numpy_iterator(),
      "tf.data: decoded images cached": lambda: train(cached, decoded=decoded).as_numpy_iterator(),
      "tf.data: 1 parallel call": lambda: train(serial).as_numpy_iterator(),
      "tf.data: decode + resize only": lambda: decode_resize_batches(records, data_cfg, total),
      "PIL/NumPy loop, 1 process": lambda: numpy_batches(records, data_cfg, seed, total),
  }
  rates = {name: [] for name in cases}
  for _ in range(repeats):
    for name, make in cases.items():
      rates[name].append(images_per_second(make(), warmup, steps))
  batch = data_cfg.p * data_cfg.k
  results = []
  for name, values in rates.items():
    rate = float(np.median(values))
    results.append({"pipeline": name, "images_per_second": rate, "ms_per_batch": 1000 * batch / rate,
                    "runs": values})
    print(f"{name:<40s} {rate:8.1f} img/s  {1000 * batch / rate:7.1f} ms/batch  "
          f"(runs {min(values):.0f}-{max(values):.0f})", flush=True)
  return results


def main(argv: Optional[list] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/input_pipeline.json")
  parser.add_argument("--data_dir", default="", help="where to generate the JPEGs (default: a temp folder)")
  parser.add_argument("--num_ids", type=int, default=100, help="generated identities (9 images each)")
  parser.add_argument("--steps", type=int, default=30, help="timed batches per pipeline")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches first (tf.data start-up)")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per pipeline (median reported)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(f"{'pipeline (384x128, batch 20)':<40s} {'rate':>14s}  {'per batch':>15s}")
  with tempfile.TemporaryDirectory() as scratch:
    results = run(pathlib.Path(args.data_dir or scratch), args.num_ids, args.steps, args.warmup, args.repeats,
                  args.seed)
  report = {"results": results, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "tensorflow": tf.__version__, "python": platform.python_version(), "steps": args.steps,
            "repeats": args.repeats,
            "load_average": os.getloadavg(),
            "image_size": [384, 128], "batch": 20}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
