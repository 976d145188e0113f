"""TFDS builder: a dozen real JPEGs in the Market-1501 layout (and a tiny HD tree) prepared and read back; the
demo prepared as TFRecords feeds training and evaluation batches equal to the files' (`data.source=tfds`)."""

import dataclasses
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import tfds as laga_tfds  # noqa: E402  (registers `laga_reid`)

# name -> (folder, RGB colour); -1 is junk (dropped), 0000 a distractor, `.jpg.jpg` as in the real release.
MARKET_FILES = {
    "bounding_box_train/0001_c1s1_000101_01.jpg": (250, 10, 10),
    "bounding_box_train/0001_c2s1_000201_01.jpg": (240, 20, 20),
    "bounding_box_train/0002_c1s1_000301_01.jpg": (10, 250, 10),
    "bounding_box_train/0002_c3s1_000401_01.jpg": (20, 240, 20),
    "query/0003_c1s1_000501_00.jpg": (10, 10, 250),
    "query/0004_c2s1_000601_00.jpg": (250, 250, 10),
    "bounding_box_test/-1_c2s1_000701_02.jpg": (0, 0, 0),
    "bounding_box_test/0000_c1s1_000801_01.jpg": (128, 128, 128),
    "bounding_box_test/0003_c2s1_000901_01.jpg": (20, 20, 240),
    "bounding_box_test/0003_c3s1_001001_01.jpg": (30, 30, 230),
    "bounding_box_test/0004_c1s1_001101_01.jpg": (240, 240, 20),
    "bounding_box_test/0004_c3s1_001201_01.jpg.jpg": (230, 230, 30),
}


def write_images(root: pathlib.Path, files: dict) -> None:
  for rel, colour in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(root / rel, format="JPEG", quality=95)


@pytest.fixture(scope="module")
def market_build(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tfds_market")
  write_images(tmp / "manual" / "Market-1501-v15.09.15", MARKET_FILES)
  builder = laga_tfds.LagaReid(config="market1501", data_dir=str(tmp / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp / "manual")))
  return builder, tmp


def test_market_splits_round_trip(market_build):
  builder, _ = market_build
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "query": 2, "gallery": 5}
  gallery = list(builder.as_dataset(split="gallery").as_numpy_iterator())
  assert [e["path"].decode() for e in gallery] == [
      "bounding_box_test/0000_c1s1_000801_01.jpg", "bounding_box_test/0003_c2s1_000901_01.jpg",
      "bounding_box_test/0003_c3s1_001001_01.jpg", "bounding_box_test/0004_c1s1_001101_01.jpg",
      "bounding_box_test/0004_c3s1_001201_01.jpg.jpg"]
  assert [(e["pid"], e["camid"], e["label"]) for e in gallery] == [(0, 1, -1), (3, 2, -1), (3, 3, -1), (4, 1, -1),
                                                                   (4, 3, -1)]
  for example in gallery:
    assert example["image"].shape == (32, 16, 3) and example["image"].dtype == np.uint8
    expected = MARKET_FILES[example["path"].decode()]
    np.testing.assert_allclose(example["image"].reshape(-1, 3).mean(0), expected, atol=4)
  train = list(builder.as_dataset(split="train").as_numpy_iterator())
  assert [(e["pid"], e["label"]) for e in train] == [(1, 0), (1, 0), (2, 1), (2, 1)]


def test_prepared_data_loads_by_name_and_from_directory(market_build):
  builder, tmp = market_build
  query = tfds.load("laga_reid/market1501", split="query", data_dir=str(tmp / "data"))
  assert [int(e["pid"]) for e in query] == [3, 4]
  # Readable without this project's code: the builder is reconstructed from the stored metadata.
  stored = tfds.builder_from_directory(os.fspath(builder.data_path))
  encoded = stored.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  first = next(iter(encoded))
  assert bytes(first["image"].numpy()[:2]) == b"\xff\xd8"  # the original JPEG bytes, not re-encoded


def test_command_line_prepares_matching_configs(market_build, capsys):
  from data_pipelines.tfds import __main__ as cli

  _, tmp = market_build
  # --manual_dir may also be the dataset folder itself.
  cli.main(["--config", "market*", "--data_dir", str(tmp / "cli"),
            "--manual_dir", str(tmp / "manual" / "Market-1501-v15.09.15")])
  assert "laga_reid/market1501: train 4, query 2, gallery 5" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["--config", "market", "--data_dir", str(tmp / "cli")])
  assert "no laga_reid config matches ['market']" in capsys.readouterr().err


def test_custom_manifest_in_manual_dir(tmp_path):
  write_images(tmp_path / "manual" / "imgs", {"a.jpg": (200, 0, 0), "b.jpg": (0, 200, 0), "c.jpg": (0, 0, 200)})
  (tmp_path / "manual" / "custom.csv").write_text(
      "path,pid,camid,split\nimgs/a.jpg,4,1,train\nimgs/b.jpg,4,1,query\nimgs/c.jpg,4,2,gallery\n")
  builder = laga_tfds.laga_reid.prepare("custom", str(tmp_path / "data"), str(tmp_path / "manual"))
  query = next(iter(builder.as_dataset(split="query").as_numpy_iterator()))
  assert (query["pid"], query["camid"], query["path"]) == (4, 1, b"imgs/b.jpg")


def test_hand_config_has_val_split_and_draws(tmp_path):
  files = {f"HD/Original Images/1-501/{pid}_{k}.jpg": (pid % 256, 40 * k, 100)
           for pid in (3, 7, 450, 460) for k in (1, 2, 3)}
  files.update({f"HD/Original Images/502-712/{pid}_1.jpg": (5, 5, 5) for pid in (502, 503)})
  write_images(tmp_path / "manual", files)
  builder = laga_tfds.LagaReid(config="hd_draw2", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 4, "val": 2, "query": 4,
                                                                          "gallery": 4}
  val = list(builder.as_dataset(split="val").as_numpy_iterator())
  assert sorted((e["pid"], e["label"], e["camid"]) for e in val) == [(3, 0, -1), (7, 1, -1)]
  gallery_pids = sorted(int(e["pid"]) for e in builder.as_dataset(split="gallery").as_numpy_iterator())
  assert gallery_pids == [450, 460, 1502, 1503]


def test_configs_and_manual_instructions():
  names = {c.name for c in laga_tfds.LagaReid.BUILDER_CONFIGS}
  assert {"market1501", "cuhk03_detected", "11k_palmar_left", "11k_palmar_left_draw9", "hd_draw1",
          "msmt17_merge_val", "custom", "demo"} <= names
  instructions = laga_tfds.LagaReid.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "<manual_dir>/11k/   for config(s) 11k_dorsal_right, 11k_dorsal_left" in instructions
  assert "<manual_dir>/MSMT17_V1/" in instructions and "list_gallery.txt" in instructions


def test_missing_manual_dir_shows_the_instructions(tmp_path):
  builder = laga_tfds.LagaReid(config="dukemtmc", data_dir=str(tmp_path / "data"))
  with pytest.raises(AssertionError, match=r"does not exist or is empty[\s\S]*<manual_dir>/DukeMTMC-reID/"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "none")))


# --- training and evaluation from the prepared TFRecords (config.data.source = "tfds") -----------------------

@pytest.fixture(scope="module")
def demo_tfds(tmp_path_factory):
  """(config with source "tfds", the demo splits parsed from the files): the demo prepared as TFRecords; the
  builder generates the demo files under its download folder, which the parser then reads as `data.root`."""
  from configs import demo
  from data_pipelines import datasets

  tmp = tmp_path_factory.mktemp("tfds_demo")
  builder = laga_tfds.laga_reid.prepare("demo", str(tmp / "data"))
  root = tmp / "data" / "downloads" / "demo"
  config = demo.get_config()
  config.data.update({"root": str(root), "source": "tfds", "tfds_dir": str(tmp / "data")})
  splits = datasets.load_splits("demo", root)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {k: len(v) for k, v in splits.items()}
  return config, splits


def _moved(records, old_root, new_root):
  """The records under another root, where no file exists: only the TFRecords can supply their pixels."""
  return [dataclasses.replace(r, path=os.path.join(new_root, os.path.relpath(r.path, old_root))) for r in records]


def test_train_and_eval_batches_from_tfds_equal_the_files(demo_tfds, tmp_path):
  from data_pipelines import input_pipeline
  from laga_jax import config_utils

  config, splits = demo_tfds
  config_utils.validate_config(config)
  files_cfg = config.data.copy_and_resolve_references()
  files_cfg.source = "files"
  tfds_cfg = config.data.copy_and_resolve_references()
  tfds_cfg.root = str(tmp_path / "absent")  # the files are not there
  train = _moved(splits["train"], config.data.root, tfds_cfg.root)
  assert not os.path.exists(train[0].path)
  for cache in (False, True):
    files_cfg.cache_decoded = tfds_cfg.cache_decoded = cache
    kwargs = dict(seed=3, epoch=1, start_step=2, num_steps=3)
    expected = list(input_pipeline.train_batches(splits["train"], files_cfg, **kwargs).as_numpy_iterator())
    got = list(input_pipeline.train_batches(train, tfds_cfg, **kwargs).as_numpy_iterator())
    assert len(got) == len(expected) == 3
    for want, have in zip(expected, got):
      assert want["image"].shape == (config.data.p * config.data.k,) + tuple(config.data.image_size) + (3,)
      np.testing.assert_array_equal(have["image"], want["image"])
      np.testing.assert_array_equal(have["label"], want["label"])
  for split in ("query", "gallery"):
    expected = list(input_pipeline.eval_batches(splits[split], files_cfg, 64).as_numpy_iterator())
    got = list(input_pipeline.eval_batches(_moved(splits[split], config.data.root, tfds_cfg.root), tfds_cfg,
                                           64).as_numpy_iterator())
    assert len(got) == len(expected) > 1
    for want, have in zip(expected, got):
      for key in ("image", "mask", "index"):
        np.testing.assert_array_equal(have[key], want[key])


def test_the_trainer_takes_its_records_from_the_tfrecords_alone(demo_tfds, tmp_path):
  """With source "tfds" the splits come from the TFRecords: the dataset folder need not exist."""
  from laga_jax import trainer
  config, splits = demo_tfds
  config = config.copy_and_resolve_references()
  config.data.root = str(tmp_path / "absent")
  got = trainer._dataset_records(config)
  assert sorted(got) == sorted(splits)
  for split, records in splits.items():
    assert got[split] == _moved(records, demo_tfds[0].data.root, config.data.root), split
  assert sorted(trainer._dataset_records(config, eval_only=True)) == ["gallery", "query"]


def test_tfds_source_refuses_unknown_images_and_an_unprepared_dir(demo_tfds, tmp_path):
  from data_pipelines import input_pipeline
  from laga_jax import config_utils

  config, splits = demo_tfds
  stranger = dataclasses.replace(splits["query"][0], path=os.path.join(config.data.root, "query", "9999_c1s1.jpg"))
  with pytest.raises(ValueError, match=r"1 of 2 images are not in laga_reid/demo at .*query/9999_c1s1\.jpg"):
    input_pipeline.eval_batches([splits["query"][1], stranger], config.data, 4)
  impostor = dataclasses.replace(splits["query"][2], pid=splits["query"][2].pid + 1)
  with pytest.raises(ValueError, match=r"is person \d+ camera \d+ in laga_reid/demo but \(\d+, \d+\) in the parsed"):
    input_pipeline.eval_batches([impostor], config.data, 4)
  empty = config.copy_and_resolve_references()
  empty.data.tfds_dir = str(tmp_path)
  with pytest.raises(config_utils.ConfigError) as info:
    config_utils.validate_config(empty)
  message = str(info.value)
  assert message.startswith(f"--config.data.tfds_dir={str(tmp_path)!r}: expected the TFDS data_dir of "
                            "--config.data.source=tfds: no prepared laga_reid/demo at ") and "\n" not in message
  assert f"python -m data_pipelines.tfds --config demo --data_dir {tmp_path}" in message
