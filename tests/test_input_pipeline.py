"""P x K plans, training and evaluation batches: structure, determinism, exact resume, sharding, errors."""

import dataclasses
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import augment, input_pipeline

MEAN, STD = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)


from data_pipelines.datasets.common import Record  # the records the parsers produce


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      image_size=(32, 16), resize_size=(36, 18), color_jitter=(0.1, 0.1, 0.1, 0.0), jitter_first=False,
      erasing_p=0.5, p=3, k=2, cache_decoded=False, num_parallel_calls=-1))
  cfg.update(overrides)
  return cfg


# 6 identities with 1..4 images: identity 0 has a single image (sampled with replacement when K > 1).
COUNTS = (1, 2, 3, 4, 2, 3)


def write_records(folder, counts=COUNTS, constant=False):
  """PNG files whose colour encodes the record index when `constant` (so a pixel tells where it came from)."""
  rng = np.random.default_rng(0)
  records = []
  for label, count in enumerate(counts):
    for _ in range(count):
      index = len(records)
      shape = (40, 20) if constant else (int(rng.integers(30, 60)), int(rng.integers(15, 30)))
      image = (np.full(shape + (3,), [index * 8, 100, 200], np.uint8) if constant
               else rng.integers(0, 256, shape + (3,), dtype=np.uint8))
      path = folder / f"{index:03d}.png"
      Image.fromarray(image).save(path)
      records.append(Record(str(path), pid=100 + label, camid=1, label=label))
  return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  return write_records(tmp_path_factory.mktemp("textured"))


@pytest.fixture(scope="module")
def constant_records(tmp_path_factory):
  return write_records(tmp_path_factory.mktemp("constant"), constant=True)


def batches(dataset):
  return list(dataset.as_numpy_iterator())


def test_steps_per_epoch():
  assert input_pipeline.steps_per_epoch(12936, 5, 4) == 646
  with pytest.raises(ValueError, match="fewer than one batch"):
    input_pipeline.steps_per_epoch(19, 5, 4)


def test_pk_plan_structure_and_replacement():
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  plan = input_pipeline.pk_index_plan(labels, 3, 2, seed=0, epoch=0, num_batches=7)
  assert plan.shape == (7, 6)
  for batch in plan:
    groups = labels[batch].reshape(3, 2)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3
    for group, label in zip(batch.reshape(3, 2), groups[:, 0]):
      assert len(set(group)) == (1 if COUNTS[label] == 1 else 2)  # distinct unless the id has 1 image
  # One cycle (floor(6 ids / P) = 2 batches) visits every identity exactly once.
  for cycle in range(3):
    assert sorted(labels[plan[2 * cycle:2 * cycle + 2, ::2]].ravel()) == list(range(6))


def test_pk_plan_samples_every_image_and_uses_any_label_values():
  labels = np.array([7, 7, 7, 7, 7, 3, 3, 9, 9, 9])
  plan = input_pipeline.pk_index_plan(labels, 2, 2, seed=1, epoch=0, num_batches=60)
  assert set(plan.ravel()) == set(range(10))


def test_pk_plan_is_deterministic_and_prefix_stable():
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  defaults = dict(p=3, k=2, seed=0, epoch=0, num_batches=5)
  plan = lambda **kw: input_pipeline.pk_index_plan(labels, **dict(defaults, **kw))
  np.testing.assert_array_equal(plan(), plan())
  np.testing.assert_array_equal(plan(num_batches=3), plan()[:3])
  assert not np.array_equal(plan(), plan(seed=1))
  assert not np.array_equal(plan(), plan(epoch=1))
  assert plan(num_batches=0).shape == (0, 6)


@pytest.mark.parametrize("kwargs, message", [(dict(p=7), "only 6 identities"), (dict(k=0), "K >= 1"),
                                             (dict(seed=-1), "non-negative")])
def test_pk_plan_rejects_bad_arguments(kwargs, message):
  labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
  with pytest.raises(ValueError, match=message):
    input_pipeline.pk_index_plan(labels, **dict(dict(p=3, k=2, seed=0, epoch=0, num_batches=1), **kwargs))


def source_index(image: np.ndarray) -> np.ndarray:
  """Record index encoded in the red channel of `constant` images, read back from normalised pixels."""
  red = (image[..., 0] * STD[0] + MEAN[0]) * 255
  assert np.allclose(red, red[..., :1, :1], atol=0.5)  # still constant: nothing but geometry was applied
  return np.round(red[:, 0, 0] / 8).astype(int)


def test_train_batches_follow_the_plan(constant_records):
  cfg = data_config(color_jitter=(0, 0, 0, 0), erasing_p=0.0)
  out = batches(input_pipeline.train_batches(constant_records, cfg, seed=3, epoch=1, num_steps=4))
  plan = input_pipeline.pk_index_plan([r.label for r in constant_records], 3, 2, 3, 1, 4)
  assert len(out) == 4
  for batch, planned in zip(out, plan):
    assert batch["image"].shape == (6, 32, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(source_index(batch["image"]), planned)
    np.testing.assert_array_equal(batch["label"], [constant_records[i].label for i in planned])


def test_train_batches_are_seeded(records):
  cfg = data_config()
  run = lambda seed: batches(input_pipeline.train_batches(records, cfg, seed=seed, epoch=0, num_steps=3))
  first, again, other = run(0), run(0), run(1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not all(np.array_equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_resume_replays_the_tail_of_the_epoch(records):
  cfg = data_config()
  full = batches(input_pipeline.train_batches(records, cfg, seed=5, epoch=2, num_steps=5))
  tail = batches(input_pipeline.train_batches(records, cfg, seed=5, epoch=2, start_step=3, num_steps=2))
  assert len(tail) == 2
  for resumed, uninterrupted in zip(tail, full[3:]):
    np.testing.assert_array_equal(resumed["image"], uninterrupted["image"])
    np.testing.assert_array_equal(resumed["label"], uninterrupted["label"])


def test_processes_take_contiguous_slices_of_each_global_batch(records):
  cfg = data_config()
  whole = batches(input_pipeline.train_batches(records, cfg, seed=2, epoch=0, num_steps=3))
  parts = [batches(input_pipeline.train_batches(records, cfg, seed=2, epoch=0, num_steps=3, process_index=i,
                                                process_count=3)) for i in range(3)]
  for step, batch in enumerate(whole):
    assert all(part[step]["image"].shape[0] == 2 for part in parts)
    np.testing.assert_array_equal(np.concatenate([part[step]["image"] for part in parts]), batch["image"])
    np.testing.assert_array_equal(np.concatenate([part[step]["label"] for part in parts]), batch["label"])
  with pytest.raises(ValueError, match="cannot be split over 4 processes"):
    input_pipeline.train_batches(records, cfg, seed=0, epoch=0, num_steps=1, process_count=4)


def test_decoded_cache_gives_the_same_batches(records):
  plain = batches(input_pipeline.train_batches(records, data_config(), seed=4, epoch=0, num_steps=3))
  cached = batches(input_pipeline.train_batches(records, data_config(cache_decoded=True), seed=4, epoch=0,
                                                num_steps=3))
  decoded = input_pipeline.DecodedImages.from_paths([r.path for r in records])
  prebuilt = batches(input_pipeline.train_batches(records, data_config(), seed=4, epoch=0, num_steps=3,
                                                  decoded=decoded))
  for a, b, c in zip(plain, cached, prebuilt):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["image"], c["image"])


def test_hand_settings_produce_square_batches(records):
  cfg = data_config(image_size=(24, 24), resize_size=(27, 27), jitter_first=True, erasing_p=0.0)
  out = batches(input_pipeline.train_batches(records, cfg, seed=0, epoch=0, num_steps=1))
  assert out[0]["image"].shape == (6, 24, 24, 3) and np.isfinite(out[0]["image"]).all()


def test_train_records_need_labels(records):
  unlabelled = [dataclasses.replace(r, label=-1) if i == 4 else r for i, r in enumerate(records)]
  with pytest.raises(ValueError, match=re.escape(records[4].path)):
    input_pipeline.train_batches(unlabelled, data_config(), seed=0, epoch=0, num_steps=1)


def test_eval_batches_pad_mask_and_keep_order(records):
  cfg = data_config()
  out = batches(input_pipeline.eval_batches(records[:11], cfg, 4))
  assert len(out) == 3
  index = np.concatenate([b["index"] for b in out])
  mask = np.concatenate([b["mask"] for b in out])
  np.testing.assert_array_equal(index, list(range(11)) + [-1])
  np.testing.assert_array_equal(mask, [True] * 11 + [False])
  settings = augment.AugmentSettings.from_config(cfg)
  images = np.concatenate([b["image"] for b in out])
  for i in (0, 5, 10):
    expected = augment.eval_transform(augment.decode(tf.io.read_file(records[i].path)), settings).numpy()
    np.testing.assert_allclose(images[i], expected, atol=1e-6)
  assert not images[11].any()


def test_eval_batches_split_over_processes(records):
  cfg = data_config()
  parts = [batches(input_pipeline.eval_batches(records[:11], cfg, 2, process_index=i, process_count=2))
           for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == 3
  index = np.concatenate([b["index"][b["mask"]] for part in parts for b in part])
  assert sorted(index) == list(range(11))
  assert parts[0][0]["index"].tolist() == [0, 1] and parts[1][0]["index"].tolist() == [2, 3]


def test_eval_of_nothing_is_empty(records):
  assert batches(input_pipeline.eval_batches([], data_config(), 4)) == []


def test_pipelines_run_without_the_autotuner(records, monkeypatch):
  """Deleting an iterator waits for tf.data's autotuner thread (seconds at every epoch's end): it is off, and
  -1 parallel calls means one per available core, at most 16; other values are taken as given."""
  train = input_pipeline.train_batches(records, data_config(), seed=0, epoch=0, num_steps=1)
  evaluate = input_pipeline.eval_batches(records, data_config(), 4)
  for dataset in (train, evaluate):
    assert dataset.options().autotune.enabled is False and dataset.options().deterministic is True
  monkeypatch.setattr(input_pipeline.os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
  assert input_pipeline._parallel_calls(data_config()) == 16
  monkeypatch.setattr(input_pipeline.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
  assert input_pipeline._parallel_calls(data_config()) == 2
  assert input_pipeline._parallel_calls(data_config(num_parallel_calls=3)) == 3
  with pytest.raises(ValueError, match="num_parallel_calls must be -1"):
    input_pipeline._parallel_calls(data_config(num_parallel_calls=0))


def corrupt(records, position, content):
  bad = records[position]
  with open(bad.path, "wb") as f:
    f.write(content)
  return bad.path


@pytest.mark.parametrize("position, content", [
    (3, None),                   # truncated PNG in the middle
    (10, b""),                   # empty file, last element
    (6, b"<html>not found</html>"),
])
def test_unreadable_file_is_named_in_eval(tmp_path, position, content):
  records = write_records(tmp_path, counts=(4, 4, 3))
  original = open(records[position].path, "rb").read()
  path = corrupt(records, position, original[:len(original) // 2] if content is None else content)
  with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(path)):
    batches(input_pipeline.eval_batches(records, data_config(), 4))


def test_unreadable_and_missing_files_are_named_in_training(tmp_path):
  records = write_records(tmp_path, counts=(1, 2, 2))
  path = corrupt(records, 0, b"\xff\xd8\xff\xe0 truncated jpeg")
  with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(path)):
    batches(input_pipeline.train_batches(records, data_config(p=3), seed=0, epoch=0, num_steps=2))
  with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(path)):
    input_pipeline.DecodedImages.from_paths([r.path for r in records])
  missing = [dataclasses.replace(records[0], path=str(tmp_path / "gone.jpg"))] + records[1:]
  with pytest.raises(tf.errors.InvalidArgumentError, match="gone.jpg"):
    batches(input_pipeline.train_batches(missing, data_config(p=3), seed=0, epoch=0, num_steps=1))


def market_records(folder):
  files = sorted(folder.glob("*.jpg"))
  return [Record(str(f), int(f.name[:4]), int(f.name[6]), label=i // 2) for i, f in enumerate(files)]


def test_real_market_images_through_the_body_pipeline(realdata_dir):
  images = realdata_dir / "market1501" / "images"
  records = market_records(images / "query") + market_records(images / "bounding_box_train")
  records = [dataclasses.replace(r, label=i // 2) for i, r in enumerate(records)]
  cfg = data_config(image_size=(384, 128), resize_size=(432, 144), p=4, k=2)
  steps = len(records) // 8
  train = batches(input_pipeline.train_batches(records, cfg, seed=0, epoch=0, num_steps=steps))
  assert len(train) == steps and all(b["image"].shape == (8, 384, 128, 3) for b in train)
  assert all(np.isfinite(b["image"]).all() for b in train)
  evaluated = batches(input_pipeline.eval_batches(records, cfg, 16))
  assert sum(b["mask"].sum() for b in evaluated) == len(records) == 48
  assert all(np.isfinite(b["image"]).all() for b in evaluated)


def test_real_hand_images_through_the_hand_pipeline(realdata_dir):
  files = sorted((realdata_dir / "11k" / "Hands_resized180").glob("*.jpg"))
  records = [Record(str(f), pid=i // 4, camid=0, label=i // 4) for i, f in enumerate(files)]
  cfg = data_config(image_size=(324, 324), resize_size=(356, 356), jitter_first=True, erasing_p=0.0, p=5, k=4)
  decoded = input_pipeline.DecodedImages.from_paths([r.path for r in records])  # decodes all 100
  assert decoded.shapes.numpy().tolist() == [[180, 180]] * len(files)
  train = batches(input_pipeline.train_batches(records, cfg, seed=0, epoch=0, num_steps=5, decoded=decoded))
  assert all(b["image"].shape == (20, 324, 324, 3) and np.isfinite(b["image"]).all() for b in train)
  evaluated = batches(input_pipeline.eval_batches(records, cfg, 32))
  assert sum(b["mask"].sum() for b in evaluated) == len(files)
