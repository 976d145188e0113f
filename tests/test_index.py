"""Gallery index and search: `run.py --mode index` / `--mode search`, incremental updates, refused indexes."""

import json
import shutil

import numpy as np
import pytest

from laga_jax import index as index_lib
from laga_jax import inference

from conftest import run_py


@pytest.fixture(scope="module")
def indexed(trained_run, tmp_path_factory):
  """run.py --mode index on the demo gallery, with the run's config.json passed back as --config."""
  workdir, data, _ = trained_run
  path = tmp_path_factory.mktemp("index") / "gallery.npz"
  done = run_py("--config", workdir / "config.json", "--workdir", workdir, "--mode", "index",
                f"--gallery_dir={data / 'bounding_box_test'}", f"--index={path}")
  assert done.returncode == 0, done.stderr[-3000:]
  return path, done


def test_index_mode(indexed, trained_run, trained_extractor):
  path, done = indexed
  gallery = sorted((trained_run[1] / "bounding_box_test").glob("*.jpg"))
  index = index_lib.GalleryIndex.load(path)
  assert index.paths == sorted(str(p.absolute()) for p in gallery)
  assert index.meta["model_id"] == trained_extractor.model_id and index.meta["image_size"] == [32, 16]
  assert index.features.shape == (len(gallery), trained_extractor.feature_dim)
  # The features are evaluation's (features_final.npz has the gallery less the junk images, id -1, that the
  # dataset loader drops; an index takes every image of the folder).
  saved = np.load(trained_run[0] / "features_final.npz")
  rows = {str(p): i for i, p in enumerate(saved["paths"])}
  evaluated = [i for i, p in enumerate(gallery) if str(p) in rows]
  assert len(evaluated) >= len(gallery) // 2
  np.testing.assert_allclose(index.features[evaluated],
                             saved["features"][[rows[str(gallery[i])] for i in evaluated]], atol=1e-5)
  assert f"{len(gallery)} images ({len(gallery)} added" in done.stdout
  assert "\r" not in done.stderr  # progress in a log: plain lines


def test_search_mode_with_a_folder_of_queries(indexed, trained_run, tmp_path):
  path, _ = indexed
  workdir, data, _ = trained_run
  queries = tmp_path / "queries"
  (queries / "nested").mkdir(parents=True)
  picked = sorted((data / "query").glob("*.jpg"))[:3]
  shutil.copy(picked[0], queries)
  shutil.copy(picked[1], queries / "nested")
  done = run_py("--config", "configs/demo.py", "--workdir", workdir, "--mode", "search", f"--query={queries}",
                f"--query={picked[2]}", f"--index={path}", "--topk=4")
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((workdir / "search_results.json").read_text())
  assert summary["num_queries"] == 3 and summary["gallery_size"] == len(index_lib.GalleryIndex.load(path))
  assert [r["query"].split("/")[-1] for r in summary["results"]] == [p.name for p in picked]
  for result in summary["results"]:
    assert [m["rank"] for m in result["matches"]] == [1, 2, 3, 4]
    sims = [m["cosine_similarity"] for m in result["matches"]]
    assert sims == sorted(sims, reverse=True)
  assert (workdir / "search_results.png").stat().st_size > 1000


def test_incremental_update(trained_run, trained_extractor, tmp_path, monkeypatch):
  data = trained_run[1]
  gallery = sorted((data / "bounding_box_test").glob("*.jpg"))
  first, second = tmp_path / "cam1", tmp_path / "cam2"
  first.mkdir()
  second.mkdir()
  for p in gallery[:5]:
    shutil.copy(p, first)
  for p in gallery[5:8]:
    shutil.copy(p, second / f"x_{p.name}")
  extracted = []
  original = trained_extractor.extract
  monkeypatch.setattr(trained_extractor, "extract",
                      lambda images, **kw: extracted.append(len(images)) or original(images, **kw))
  path = tmp_path / "index.npz"
  _, stats = index_lib.update_index(trained_extractor, [str(first)], path)
  assert stats == {"added": 5, "updated": 0, "removed": 0, "kept": 0, "total": 5}
  _, stats = index_lib.update_index(trained_extractor, [str(second)], path)  # another folder: added
  assert stats == {"added": 3, "updated": 0, "removed": 0, "kept": 5, "total": 8}
  _, stats = index_lib.update_index(trained_extractor, [str(first)], path)   # nothing new: nothing extracted
  assert stats["total"] == 8 and stats["kept"] == 8
  assert extracted == [5, 3]
  changed = sorted(first.iterdir())[0]
  shutil.copy(gallery[20], changed)               # replaced by another picture
  sorted(first.iterdir())[1].unlink()             # deleted
  index, stats = index_lib.update_index(trained_extractor, [str(first)], path)
  assert stats == {"added": 0, "updated": 1, "removed": 1, "kept": 6, "total": 7}
  assert extracted == [5, 3, 1]
  row = index.paths.index(str(changed))
  np.testing.assert_allclose(index.features[row], original([str(gallery[20])])[0], atol=1e-5)
  assert index.paths == sorted(index.paths)
  # Searching the index: an indexed image finds itself first.
  results = index_lib.search(trained_extractor, index, [index.paths[3]], topk=3)
  assert results[0]["matches"][0]["path"] == index.paths[3]
  assert results[0]["matches"][0]["distance"] == pytest.approx(0.0, abs=1e-5)


def _copy_with(index, **meta):
  return index_lib.GalleryIndex(index.features, index.paths, index.sizes, index.mtimes, dict(index.meta, **meta))


def test_foreign_and_stale_indexes_are_refused(trained_run, trained_extractor, tmp_path):
  folder = tmp_path / "g"
  folder.mkdir()
  for p in sorted((trained_run[1] / "bounding_box_test").glob("*.jpg"))[:2]:
    shutil.copy(p, folder)
  path = tmp_path / "index.npz"
  index, _ = index_lib.update_index(trained_extractor, [str(folder)], path)
  index.check(trained_extractor)
  stale = _copy_with(index, model_id="0" * 16, step=1)
  with pytest.raises(index_lib.IndexMismatchError, match=r"step 1 .* of this run, .* now step 6: it is stale"):
    stale.check(trained_extractor)
  foreign = _copy_with(index, model_id="0" * 16, model="bot", workdir="/elsewhere", fingerprint={})
  with pytest.raises(index_lib.IndexMismatchError, match=r"another model \(bot .*not comparable.*--rebuild_index"):
    foreign.check(trained_extractor)
  with pytest.raises(index_lib.IndexMismatchError, match=r"image size \[64, 32\]"):
    _copy_with(index, image_size=[64, 32]).check(trained_extractor)
  _copy_with(index, model_id="0" * 16).save(path)
  with pytest.raises(index_lib.IndexMismatchError, match="stale"):
    index_lib.update_index(trained_extractor, [str(folder)], path)
  rebuilt, stats = index_lib.update_index(trained_extractor, [str(folder)], path, rebuild=True)
  assert stats["added"] == 2 and rebuilt.meta["model_id"] == trained_extractor.model_id
  path.write_bytes(b"not an index")
  with pytest.raises(index_lib.IndexMismatchError, match="not a gallery index"):
    index_lib.GalleryIndex.load(path)


def test_find_images_is_recursive(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  for name in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt", "z.bmp"):
    (tmp_path / name).write_bytes(b"")
  assert [p[len(str(tmp_path)) + 1:] for p in inference.find_images(tmp_path)] == ["a/b/y.PNG", "a/x.jpg", "z.bmp"]
