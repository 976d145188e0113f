"""The synthetic Market-layout demo dataset: layout, determinism, idempotence, speed."""

import hashlib
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines import demo

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SMALL = dict(num_train_ids=6, num_test_ids=4, images_per_id_per_cam=2, num_cams=3, num_distractors=3, num_junk=2)


def _parse(folder):
  rows = []
  for path in sorted(folder.iterdir()):
    match = MARKET_NAME.match(path.name)
    assert match, f"{path.name} does not follow the Market-1501 naming scheme"
    rows.append((int(match.group(1)), int(match.group(2))))
  return rows


def _digest(root):
  files = sorted(p for p in root.rglob("*.jpg"))
  return [(p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
  return demo.generate_demo_dataset(tmp_path_factory.mktemp("demo") / "set", **SMALL)


def test_market_layout_and_counts(small_root):
  train = _parse(small_root / "bounding_box_train")
  query = _parse(small_root / "query")
  gallery = _parse(small_root / "bounding_box_test")
  assert len(train) == 6 * 3 * 2
  assert len(query) == 4 * 3
  assert len(gallery) == 4 * 3 * 2 + 3 + 2
  train_ids = {pid for pid, _ in train}
  test_ids = {pid for pid, _ in query}
  assert len(train_ids) == 6 and len(test_ids) == 4 and not train_ids & test_ids
  assert {pid for pid, _ in gallery} == test_ids | {0, -1}
  # Every query has a true match under another camera (the body protocol drops same-camera matches).
  for pid, cam in query:
    assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery)
  assert {cam for _, cam in train} == {1, 2, 3}
  marker = json.loads((small_root / demo.MARKER).read_text())
  assert marker["counts"] == {"bounding_box_train": 36, "query": 12, "bounding_box_test": 29}


def test_images_are_valid_jpegs_of_the_requested_size(tmp_path):
  root = demo.generate_demo_dataset(tmp_path, **dict(SMALL, height=96, width=32, num_train_ids=2, num_test_ids=2))
  for path in root.rglob("*.jpg"):
    with Image.open(path) as image:
      assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 96)


def test_identities_are_recognisable_but_cameras_shift_colours(small_root):
  files = sorted((small_root / "bounding_box_train").iterdir())
  images = np.stack([np.asarray(Image.open(p), np.float32) for p in files])
  pids = np.array([int(p.name[:4]) for p in files])
  cams = np.array([int(p.name[6]) for p in files])
  # Mean colour of the torso and of the legs: a crude identity signature.
  torso, legs = images[:, 28:58, 26:38].mean(axis=(1, 2)), images[:, 77:109, 26:38].mean(axis=(1, 2))
  features = np.concatenate([torso, legs], axis=1)
  distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
  np.fill_diagonal(distances, np.inf)
  assert np.mean(pids[distances.argmin(axis=1)] == pids) > 0.7
  # The same identity looks different under another camera (colour cast, background).
  same_id_other_cam = (pids[:, None] == pids[None]) & (cams[:, None] != cams[None])
  same_id_same_cam = (pids[:, None] == pids[None]) & (cams[:, None] == cams[None]) & np.isfinite(distances)
  assert distances[same_id_other_cam].mean() > 1.5 * distances[same_id_same_cam].mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, small_root):
  again = demo.generate_demo_dataset(tmp_path / "again", **SMALL)
  other = demo.generate_demo_dataset(tmp_path / "other", **dict(SMALL, seed=1))
  assert _digest(again) == _digest(small_root)
  assert _digest(other) != _digest(small_root)


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
  root = demo.generate_demo_dataset(tmp_path, **SMALL)
  marker = root / demo.MARKER
  stamp = marker.stat().st_mtime_ns
  some_file = next((root / "query").iterdir())
  some_file.write_bytes(b"left alone")  # a second call with the same parameters must not touch files
  demo.generate_demo_dataset(tmp_path, **SMALL)
  assert marker.stat().st_mtime_ns == stamp and some_file.read_bytes() == b"left alone"
  demo.generate_demo_dataset(tmp_path, **dict(SMALL, num_test_ids=5))
  assert len(list((root / "query").iterdir())) == 5 * 3
  assert json.loads(marker.read_text())["params"]["num_test_ids"] == 5
  assert not list(root.glob(".demo_tmp_*"))


def test_refuses_to_overwrite_folders_it_did_not_write(tmp_path):
  (tmp_path / "bounding_box_train").mkdir()
  (tmp_path / "bounding_box_train" / "0001_c1s1_000001_01.jpg").write_bytes(b"real data")
  with pytest.raises(FileExistsError, match="did not write"):
    demo.generate_demo_dataset(tmp_path, **SMALL)


@pytest.mark.parametrize("bad, message", [(dict(num_cams=1), "num_cams"), (dict(num_train_ids=0), "num_train_ids"),
                                          (dict(num_junk=-1), "num_junk")])
def test_bad_parameters_are_named(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    demo.generate_demo_dataset(tmp_path, **dict(SMALL, **bad))


def test_default_dataset_is_fast_and_cli_reuses_it(tmp_path, capsys):
  start = time.perf_counter()
  demo.main(["--root", str(tmp_path)])
  elapsed = time.perf_counter() - start
  # About 3 s here; the bound leaves room for a machine shared with other jobs.
  assert elapsed < 20, f"generating the default demo dataset took {elapsed:.1f} s"
  assert "'bounding_box_train': 480" in capsys.readouterr().out
  start = time.perf_counter()
  demo.main(["--root", str(tmp_path)])
  assert time.perf_counter() - start < 1.0
