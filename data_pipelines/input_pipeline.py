"""tf.data input: P x K training batches from a NumPy index plan, and padded, masked evaluation batches.

A training epoch is a pure function of (seed, epoch): `pk_index_plan` fixes which record fills every slot of
every batch, and each slot's augmentation seed is derived from (seed, epoch, slot position). Resuming at step
s of an epoch slices the same plan, so it sees exactly the batches an uninterrupted run would. With several
processes, each takes its contiguous slice of every global batch.

Records are any objects with `.path` and `.label` (train labels are 0..C-1), e.g. `data_pipelines.datasets`.

Images come from the records' files (`config.data.source = "files"`) or, with "tfds", from the TFRecords the
TFDS builder `data_pipelines/tfds` prepared under `config.data.tfds_dir`: each record's stored bytes are the
file's own, found by its path relative to `config.data.root`, and go through the same decoding and
augmentation, so both sources give equal batches.
"""

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import SOURCES, augment

# Spawn keys separate the random streams drawn from one (seed, epoch): identity plan and augmentation.
_PLAN_STREAM = 0
_AUGMENT_STREAM = 1


def steps_per_epoch(num_train_images: int, p: int, k: int) -> int:
  """Batches per epoch: floor(train images / (P * K)) (docs/fidelity.md, sampler)."""
  steps = num_train_images // (p * k)
  if steps < 1:
    raise ValueError(f"the training set has {num_train_images} images, fewer than one batch of "
                     f"config.data.p * config.data.k = {p} * {k}")
  return steps


def _check_seed(seed: int, epoch: int) -> None:
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}")


def _sample_k(ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, k: int,
              rng: np.random.Generator) -> np.ndarray:
  """K offsets into each identity's images: distinct when it has >= K images, else with replacement."""
  n = counts[ids][:, None]
  # Sorting random keys, with the slots past an identity's image count pushed last, draws K distinct images.
  keys = rng.random((len(ids), max(int(counts.max()), k)))
  keys[np.arange(keys.shape[1])[None, :] >= n] = np.inf
  distinct = np.argsort(keys, axis=1)[:, :k]
  repeated = (rng.random((len(ids), k)) * n).astype(np.int64)
  return starts[ids][:, None] + np.where(n >= k, distinct, repeated)


def pk_index_plan(labels: Sequence[int], p: int, k: int, seed: int, epoch: int, num_batches: int) -> np.ndarray:
  """(num_batches, P * K) record indices: every batch holds P distinct identities x K images each.

  Identities are visited in a shuffled order, P per batch; after floor(#ids / P) batches the order is
  reshuffled (the left-over identities wait for the next cycle). Deterministic in (seed, epoch), and the plan
  for n batches is a prefix of the plan for more, which is what makes mid-epoch resume exact.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
  if p < 1 or k < 1 or num_batches < 0:
    raise ValueError(f"need P >= 1, K >= 1 and num_batches >= 0, got P={p}, K={k}, num_batches={num_batches}")
  _check_seed(seed, epoch)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  if len(counts) < p:
    raise ValueError(f"config.data.p = {p} identities per batch, but the training set has only "
                     f"{len(counts)} identities")
  members = np.argsort(inverse, kind="stable")  # record indices grouped by identity
  starts = np.cumsum(counts) - counts
  batches_per_cycle = len(counts) // p
  cycles = []
  for cycle in range(-(-num_batches // batches_per_cycle)):
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch], spawn_key=(_PLAN_STREAM, cycle)))
    ids = rng.permutation(len(counts))[:batches_per_cycle * p]
    cycles.append(members[_sample_k(ids, starts, counts, k, rng)])
  if not cycles:
    return np.zeros((0, p * k), np.int64)
  return np.concatenate(cycles)[:num_batches * p].reshape(num_batches, p * k).astype(np.int64)


def augmentation_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
  """(n, 2) int64 stateless seeds: one key per (seed, epoch) and the slot's position in the epoch plan."""
  _check_seed(seed, epoch)
  key = np.random.SeedSequence([seed, epoch], spawn_key=(_AUGMENT_STREAM,)).generate_state(1, np.uint32)[0]
  positions = np.asarray(positions, np.int64)
  return np.stack([np.full_like(positions, key), positions], axis=-1)


@dataclasses.dataclass(frozen=True)
class EncodedImages:
  """Every record's encoded image bytes (JPEG/PNG/...), read once from a prepared TFDS config
  (`config.data.source = "tfds"`): the bytes `tf.io.read_file` returns for the record's file, since the
  builder stores the source files unchanged, so decoding them gives the same pixels.
  """
  contents: tf.Variable   # (N,) string, row i = record i; a variable so tf.data captures it by reference

  @classmethod
  def from_tfds(cls, records: Sequence, data_cfg: ml_collections.ConfigDict) -> "EncodedImages":
    """The bytes of `records` (parsed from `data_cfg.root`) from `data_cfg.tfds_dir`; cached per record list,
    so a trainer calling `train_batches` once per epoch reads the TFRecords once."""
    root = os.fspath(data_cfg.root or ".")
    base = os.path.dirname(root) if os.path.isfile(root) else root  # a manifest's paths are relative to it
    keys = tuple(os.path.relpath(r.path, base) for r in records)
    identities = (tuple((int(r.pid), int(r.camid)) for r in records)
                  if all(hasattr(r, "pid") and hasattr(r, "camid") for r in records) else None)
    options = data_cfg.get("options")
    return _encoded_from_tfds(str(data_cfg.get("tfds_dir", "")), str(data_cfg.name),
                              options.to_json() if options is not None else "{}", keys, identities)

  def read(self, index: tf.Tensor) -> tf.Tensor:
    """The encoded bytes of record `index` (a scalar string tensor)."""
    return tf.gather(self.contents, index)


@functools.lru_cache(maxsize=8)
def _encoded_from_tfds(data_dir: str, dataset: str, options_json: str, keys: tuple,
                       identities: Optional[tuple]) -> EncodedImages:
  import json

  from data_pipelines.tfds import laga_reid  # Deferred: TFDS is only imported for this source.
  config = laga_reid.config_name(dataset, json.loads(options_json))
  contents = laga_reid.encoded_images(data_dir, config, keys, identities)
  return EncodedImages(tf.Variable(tf.constant(list(contents), tf.string), trainable=False))


def _encoded_images(records: Sequence, data_cfg: ml_collections.ConfigDict) -> Optional[EncodedImages]:
  """The records' bytes when `config.data.source` is "tfds", else None (read from the files)."""
  source = data_cfg.get("source", "files")
  if source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {', '.join(SOURCES)}, got {source!r}")
  return EncodedImages.from_tfds(records, data_cfg) if source == "tfds" and len(records) else None


@dataclasses.dataclass(frozen=True)
class DecodedImages:
  """Every image of a record list decoded once, kept in memory as one flat uint8 buffer (`cache_decoded`).

  Costs height x width x 3 bytes per image (Market-1501 train: 0.3 GB; 11k originals: 5.8 MB each).
  Build it once per run and pass it to `train_batches` for every epoch.
  """
  pixels: tf.Variable     # flat uint8; a variable so tf.data captures it by reference, not as a graph constant
  offsets: tf.Tensor      # (N,) int64 start of each image in `pixels`
  shapes: tf.Tensor       # (N, 2) int64 height, width

  @classmethod
  def from_paths(cls, paths: Sequence[str], num_parallel_calls: int = tf.data.AUTOTUNE, *,
                 encoded: Optional[EncodedImages] = None) -> "DecodedImages":
    """Decode `paths` in parallel (their bytes from `encoded` when given, row i for path i); fails naming
    the first image that does not decode."""
    dataset = tf.data.Dataset.from_tensor_slices({"path": np.asarray(paths, str), "index": np.arange(len(paths)),
                                                  "seq": np.arange(len(paths))})
    images = [e["image"] for e in _read_images(dataset, paths, num_parallel_calls, encoded).as_numpy_iterator()]
    sizes = np.array([im.size for im in images], np.int64)
    flat = np.concatenate([im.ravel() for im in images]) if images else np.zeros(0, np.uint8)
    return cls(tf.Variable(flat, trainable=False), tf.constant(np.cumsum(sizes) - sizes),
               tf.constant(np.array([im.shape[:2] for im in images], np.int64).reshape(-1, 2)))

  def image(self, index: tf.Tensor) -> tf.Tensor:
    """Decoded uint8 image `index`, as `augment.decode` returns it."""
    size = tf.reduce_prod(self.shapes[index]) * 3
    flat = tf.gather(self.pixels, tf.range(self.offsets[index], self.offsets[index] + size))
    return tf.reshape(flat, tf.concat([self.shapes[index], [3]], 0))


# tf.data converts each function it is given with AutoGraph unless told not to. These functions use
# TensorFlow's own control flow (tf.cond, tf.switch_case) and no Python branch on a tensor, so converting them
# changes nothing but costs time: 1.1 s of a training epoch's set-up (augmentation's call tree).
_no_autograph = tf.autograph.experimental.do_not_convert


def _read_images(dataset: tf.data.Dataset, paths: Sequence[str], num_parallel_calls: int,
                 encoded: Optional[EncodedImages] = None) -> tf.data.Dataset:
  """Replace each element's "path" by its decoded uint8 "image"; an unreadable file fails naming its path.

  Elements must carry their sequence number "seq" (0..len(paths)-1, in order); an element whose "path" is ""
  (padding) gets a 1x1 black image. With `encoded`, the bytes are its row "index" (the element's record)
  instead of the file's. TensorFlow's decode errors do not name the file, so failed elements are
  dropped (`ignore_errors`) and a running counter spots the gap and fails with the missing element's path;
  an end sentinel catches a failure in the last element.
  """
  def read(element):
    path = element["path"]
    contents = (lambda: encoded.read(element["index"])) if encoded is not None else (lambda: tf.io.read_file(path))
    image = tf.cond(path == "", lambda: tf.zeros([1, 1, 3], tf.uint8), lambda: augment.decode(contents()))
    return dict({k: v for k, v in element.items() if k != "path"}, image=image)

  dataset = dataset.map(_no_autograph(read), num_parallel_calls, deterministic=True)
  total = len(paths)
  if total == 0:
    return dataset
  table = tf.constant(np.asarray(paths, str))
  spec = dataset.element_spec
  sentinel = {name: tf.zeros([d or 0 for d in s.shape], s.dtype) for name, s in spec.items()}
  sentinel["seq"] = tf.constant(total, spec["seq"].dtype)

  def check(expected, element):
    missing = tf.gather(table, tf.minimum(expected, total - 1))
    ok = tf.debugging.Assert(tf.equal(element["seq"], expected),
                             ["cannot read or decode image file", missing,
                              "(missing, empty, truncated or not a JPEG/PNG/BMP/GIF image)"])
    with tf.control_dependencies([ok]):
      return expected + 1, tf.nest.map_structure(tf.identity, element)

  dataset = dataset.ignore_errors().concatenate(tf.data.Dataset.from_tensors(sentinel))
  dataset = dataset.scan(tf.constant(0, spec["seq"].dtype), _no_autograph(check))
  return dataset.filter(_no_autograph(lambda e: e["seq"] < total))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # tf.data's autotuner runs in a thread that sleeps between its rounds, and deleting an iterator waits for
  # that sleep to end: 4-17 s at every epoch's end (one iterator per epoch) and after each evaluation split,
  # measured on the demo run. The fixed parallelism of `_parallel_calls` is what the autotuner starts from;
  # it made no difference to throughput here (benchmarks/RESULTS.md, input pipeline).
  options.autotune.enabled = False
  return options


# tf.data's own starting point for AUTOTUNE map parallelism: one call per core, at most 16.
MAX_PARALLEL_CALLS = 16


def _parallel_calls(data_cfg: ml_collections.ConfigDict) -> int:
  """`config.data.num_parallel_calls`, with -1 as one call per available CPU core (at most 16)."""
  calls = int(data_cfg.num_parallel_calls)
  if calls != -1 and calls < 1:
    raise ValueError(f"config.data.num_parallel_calls must be -1 (one per core) or >= 1, got {calls}")
  if calls == -1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_PARALLEL_CALLS)
  return calls


def _check_process(process_index: int, process_count: int, batch: int, what: str) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
  if batch % process_count:
    raise ValueError(f"{what} = {batch} images per global batch cannot be split over {process_count} processes")
  return batch // process_count


def train_batches(records: Sequence, data_cfg: ml_collections.ConfigDict, *, seed: int, epoch: int,
                  start_step: int = 0, num_steps: int, process_index: int = 0, process_count: int = 1,
                  decoded: Optional[DecodedImages] = None) -> tf.data.Dataset:
  """Steps [start_step, start_step + num_steps) of `epoch` as {"image": (B, H, W, 3) f32, "label": (B,) i32}.

  B = P * K / process_count: this process's slice of every global batch. With `config.data.cache_decoded`,
  images come from `decoded` (built here when not given; build it once per run to save the decoding).
  `config.data.source` says where the encoded images are read: the files, or the prepared TFRecords.
  """
  settings = augment.AugmentSettings.from_config(data_cfg)
  p, k = int(data_cfg.p), int(data_cfg.k)
  local = _check_process(process_index, process_count, p * k, "config.data.p * config.data.k")
  if start_step < 0 or num_steps < 0:
    raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, {num_steps}")
  labels = np.array([r.label for r in records], np.int64)
  if labels.size and labels.min() < 0:
    bad = records[int(np.argmin(labels))]
    raise ValueError(f"training records need labels >= 0 (relabelled identities); {bad.path} has {bad.label}")
  plan = pk_index_plan(labels, p, k, seed, epoch, start_step + num_steps)[start_step:]
  positions = np.arange(start_step * p * k, (start_step + num_steps) * p * k).reshape(num_steps, p * k)
  mine = slice(process_index * local, (process_index + 1) * local)
  index, positions = plan[:, mine].ravel(), positions[:, mine].ravel()
  paths = np.asarray([r.path for r in records], str)[index]
  parallel = _parallel_calls(data_cfg)
  encoded = _encoded_images(records, data_cfg) if decoded is None else None
  if data_cfg.cache_decoded and decoded is None:
    decoded = DecodedImages.from_paths([r.path for r in records], parallel, encoded=encoded)

  columns = {"index": index, "label": labels[index].astype(np.int32), "seq": np.arange(len(index)),
             "seed": augmentation_seeds(seed, epoch, positions)}
  if decoded is None:
    dataset = tf.data.Dataset.from_tensor_slices(dict(columns, path=paths))
    dataset = _read_images(dataset, paths, parallel, encoded)
  else:
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    dataset = dataset.map(_no_autograph(lambda e: dict(e, image=decoded.image(e["index"]))), parallel,
                          deterministic=True)
  augment_one = lambda e: {"image": augment.train_transform(e["image"], e["seed"], settings), "label": e["label"]}
  dataset = dataset.map(_no_autograph(augment_one), parallel, deterministic=True)
  dataset = dataset.batch(local, drop_remainder=True)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(records: Sequence, data_cfg: ml_collections.ConfigDict, batch_size: int, *,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Records in order as {"image", "mask", "index"} batches of `batch_size`; the tail is padded.

  Padding slots have mask False, index -1 and a zero image. Every record appears exactly once over all
  processes; process i takes slice i of each global batch of batch_size * process_count, and all
  processes get the same number of batches. Images are read from `config.data.source`, as in training.
  """
  settings = augment.AugmentSettings.from_config(data_cfg)
  if batch_size < 1:
    raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
  global_batch = batch_size * process_count
  _check_process(process_index, process_count, global_batch, "the eval batch")
  num_batches = math.ceil(len(records) / global_batch)
  slots = np.full(num_batches * global_batch, -1, np.int64)
  slots[:len(records)] = np.arange(len(records))
  index = slots.reshape(num_batches, process_count, batch_size)[:, process_index].ravel()
  paths = np.asarray([r.path for r in records] + [""], str)[index]  # index -1 (padding) reads ""

  def transform(element):
    valid = element["index"] >= 0
    image = tf.cond(valid, lambda: augment.eval_transform(element["image"], settings),
                    lambda: tf.zeros(settings.image_size + (3,), tf.float32))
    return {"image": image, "mask": valid, "index": element["index"]}

  parallel = _parallel_calls(data_cfg)
  encoded = _encoded_images(records, data_cfg)
  dataset = tf.data.Dataset.from_tensor_slices({"path": paths, "index": index, "seq": np.arange(len(index))})
  dataset = _read_images(dataset, paths, parallel, encoded).map(_no_autograph(transform), parallel, deterministic=True)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options())
