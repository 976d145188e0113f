"""Bad images are found up front (every split, in parallel, cached), named in one line, or skipped on request."""

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import datasets, image_check
from data_pipelines.datasets.common import Record


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  monkeypatch.setenv("LAGA_CACHE_DIR", str(tmp_path / "cache"))
  image_check._REPORTED.clear()


def _jpeg(seed=0, size=(40, 30)) -> bytes:
  pixels = (np.random.default_rng(seed).random(size + (3,)) * 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def _bad_files(folder):
  """One of each kind of bad file, and the reason the check must give."""
  folder.mkdir(parents=True, exist_ok=True)
  good = _jpeg()
  tiff = io.BytesIO()
  Image.new("RGB", (8, 8)).save(tiff, "TIFF")
  files = {"empty.jpg": (b"", "empty file"),
           "truncated.jpg": (good[:len(good) // 2], "truncated or corrupt"),
           "text.jpg": (b"<html>404 not found</html>", "not an image"),
           "tiff.jpg": (tiff.getvalue(), "TIFF image, expected JPEG, PNG, GIF or BMP")}
  for name, (data, _) in files.items():
    (folder / name).write_bytes(data)
  os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
  expected = {str(folder / name): reason for name, (_, reason) in files.items()}
  expected[str(folder / "dangling.jpg")] = "broken symbolic link"
  return expected


def test_every_kind_of_bad_file_is_found(tmp_path):
  expected = _bad_files(tmp_path / "imgs")
  (tmp_path / "imgs" / "good.jpg").write_bytes(_jpeg())
  Image.new("RGB", (9, 7)).save(tmp_path / "imgs" / "good.png")
  paths = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
  bad = image_check.check_files(paths, workers=4)
  assert sorted(bad) == sorted(expected)
  for path, reason in expected.items():
    assert bad[path].startswith(reason), (path, bad[path])


def test_verdicts_are_cached_and_a_changed_file_is_checked_again(tmp_path, monkeypatch):
  folder = tmp_path / "imgs"
  folder.mkdir()
  paths = []
  for i in range(5):
    (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    paths.append(str(folder / f"{i}.jpg"))
  assert image_check.check_files(paths, root=folder) == {}
  calls = []
  real = image_check.check_image
  monkeypatch.setattr(image_check, "check_image", lambda p: calls.append(p) or real(p))
  assert image_check.check_files(paths, root=folder) == {}
  assert calls == []  # a rerun only stats the files
  (folder / "3.jpg").write_bytes(b"broken now, and of another size")
  assert list(image_check.check_files(paths, root=folder)) == [str(folder / "3.jpg")]
  assert calls == [str(folder / "3.jpg")]


def _market(root, gallery_extra=None):
  for folder, names in (("bounding_box_train", ["0002_c1s1_000451_01.jpg", "0002_c2s1_000452_01.jpg",
                                                "0007_c1s1_000453_01.jpg", "0007_c3s1_000454_01.jpg"]),
                        ("query", ["0011_c1s1_000455_01.jpg"]),
                        ("bounding_box_test", ["0011_c2s1_000456_01.jpg", "0000_c1s1_000457_01.jpg"])):
    (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
      (root / folder / name).write_bytes(_jpeg(i))
  return root


def test_bad_and_dangling_files_in_any_split_stop_with_one_line(tmp_path):
  root = _market(tmp_path / "market")
  (root / "query" / "0011_c3s1_000458_01.jpg").write_bytes(b"")
  os.symlink(root / "nowhere.jpg", root / "bounding_box_test" / "0011_c4s1_000459_01.jpg")
  splits = datasets.load_splits("market1501", root)
  # The dangling link is listed (not silently dropped): the gallery keeps its size.
  assert len(splits["gallery"]) == 3
  with pytest.raises(image_check.BadImagesError) as info:
    image_check.check_splits(splits, dataset="market1501", root=str(root))
  message = str(info.value)
  assert "\n" not in message and message.startswith("2 unreadable image(s) in dataset 'market1501': ")
  assert f"{root}/query/0011_c3s1_000458_01.jpg (empty file)" in message
  assert f"{root}/bounding_box_test/0011_c4s1_000459_01.jpg (broken symbolic link to" in message
  assert "--config.data.bad_images=skip" in message


def test_skip_leaves_them_out_says_which_and_keeps_labels_contiguous(tmp_path, caplog):
  root = _market(tmp_path / "market")
  for name in ("0002_c1s1_000451_01.jpg", "0002_c2s1_000452_01.jpg"):  # every train image of id 2
    (root / "bounding_box_train" / name).write_bytes(b"not a jpeg")
  splits = datasets.load_splits("market1501", root)
  assert sorted({r.label for r in splits["train"]}) == [0, 1]
  with caplog.at_level(logging.WARNING, logger="laga_jax"):
    kept = image_check.check_splits(splits, dataset="market1501", root=str(root), policy="skip")
  assert [(r.pid, r.label) for r in kept["train"]] == [(7, 0), (7, 0)]
  assert kept["query"] == splits["query"] and kept["gallery"] == splits["gallery"]
  assert "skipping 2 unreadable image(s)" in caplog.text and "0002_c1s1_000451_01.jpg (not an image)" in caplog.text


def test_val_images_follow_their_identity_when_skipping():
  train = [Record("/a/1.jpg", 5, -1, 0), Record("/a/2.jpg", 8, -1, 1), Record("/a/3.jpg", 8, -1, 1)]
  val = [Record("/a/4.jpg", 5, -1, 0), Record("/a/5.jpg", 8, -1, 1)]
  kept = image_check._relabel_after_skip({"train": train[1:], "val": val})
  assert [(r.pid, r.label) for r in kept["train"]] == [(8, 0), (8, 0)]
  assert [(r.pid, r.label) for r in kept["val"]] == [(8, 0)]


def test_search_gallery_is_checked(tmp_path):
  (tmp_path / "g" / "sub").mkdir(parents=True)
  (tmp_path / "g" / "a.jpg").write_bytes(_jpeg(1))
  (tmp_path / "g" / "sub" / "b.jpg").write_bytes(b"")
  (tmp_path / "q.jpg").write_bytes(_jpeg(2))
  gallery = [str(tmp_path / "g" / "a.jpg"), str(tmp_path / "g" / "sub" / "b.jpg")]
  with pytest.raises(image_check.BadImagesError, match=r"1 unreadable image\(s\) in --gallery_dir .*b.jpg \(empty"):
    image_check.check_search_images(str(tmp_path / "q.jpg"), gallery, gallery_dir=str(tmp_path / "g"))
  assert image_check.check_search_images(str(tmp_path / "q.jpg"), gallery, gallery_dir=str(tmp_path / "g"),
                                         policy="skip") == gallery[:1]
  (tmp_path / "q.jpg").write_bytes(b"x")
  with pytest.raises(image_check.BadImagesError, match=r"--query .*q.jpg: cannot be read as an image"):
    image_check.check_search_images(str(tmp_path / "q.jpg"), gallery, gallery_dir=str(tmp_path / "g"))
