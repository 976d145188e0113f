"""The Python API (`laga_jax.inference`) and saved-config reloading, on a tiny run trained by run.py."""

import json

import numpy as np
import pytest
from PIL import Image

from laga_jax import inference, saved_config
from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import figures, metrics


def _evaluation_features(workdir):
  saved = np.load(workdir / "features_final.npz")
  return [str(p) for p in saved["paths"]], saved["features"]


def test_from_workdir_reads_saved_config_and_checkpoint(trained_run, trained_extractor):
  workdir, _, _ = trained_run
  meta = trained_extractor.metadata
  assert trained_extractor.image_size == (32, 16)
  assert meta["model"] == "laga" and meta["checkpoint"] == "latest" and meta["step"] == 6
  assert meta["feature_dim"] == 6 * 8 * 32  # six heads x layer4 width (8 x 2^3 x 4)
  assert len(meta["model_id"]) == 16 and meta["workdir"] == str(workdir)
  assert trained_extractor.config.model.width == 8 and trained_extractor.config.eval.batch_size == 32
  assert "opt_state" not in trained_extractor.variables  # parameters and BN statistics only
  assert set(trained_extractor.variables) == {"params", "batch_stats"}


def test_features_equal_evaluation_features(trained_run, trained_extractor):
  """The README's promise: extract() on the evaluated images gives evaluation's saved features."""
  paths, expected = _evaluation_features(trained_run[0])
  features = trained_extractor.extract(paths)
  assert features.dtype == np.float32 and features.shape == expected.shape
  np.testing.assert_allclose(features, expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def test_one_compilation_per_batch_shape(trained_run, trained_extractor):
  paths, expected = _evaluation_features(trained_run[0])
  trained_extractor.extract(paths[:5], batch_size=8)
  compiled = features_lib.flip_sum_normalise._cache_size()
  for count in (3, 8, 13):  # a short batch, a full one, one and a half: all padded to 8 rows
    np.testing.assert_allclose(trained_extractor.extract(paths[:count], batch_size=8), expected[:count], atol=1e-5)
  assert features_lib.flip_sum_normalise._cache_size() == compiled


def test_pil_images_and_arrays(trained_run, trained_extractor, tmp_path):
  """PIL images and uint8 arrays go through evaluation's resize; lossless PNGs match their paths."""
  paths, _ = _evaluation_features(trained_run[0])
  pngs = []
  for i, path in enumerate(paths[:3]):
    pngs.append(tmp_path / f"{i}.png")
    Image.open(path).resize((40, 90)).save(pngs[-1])
  from_paths = trained_extractor.extract([str(p) for p in pngs])
  pil = [Image.open(p) for p in pngs]
  arrays = [np.asarray(image.convert("RGB")) for image in pil]
  np.testing.assert_allclose(trained_extractor.extract(pil), from_paths, atol=1e-5)
  np.testing.assert_allclose(trained_extractor.extract(arrays), from_paths, atol=1e-5)
  mixed = trained_extractor.extract([str(pngs[0]), pil[1], arrays[2]])
  np.testing.assert_allclose(mixed, from_paths, atol=1e-5)
  np.testing.assert_allclose(trained_extractor.extract(str(pngs[1])), from_paths[1:2], atol=1e-5)
  grey = np.asarray(pil[0].convert("L"))
  assert trained_extractor.extract(grey).shape == (1, trained_extractor.feature_dim)
  # uint8 pixels at the model's size: extract (TF resize is the identity) == extract_pixels (the export contract)
  sized = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 32))) for p in pngs])
  np.testing.assert_allclose(trained_extractor.extract(sized), trained_extractor.extract_pixels(sized), atol=1e-6)
  with pytest.raises(TypeError, match="uint8"):
    trained_extractor.extract(sized.astype(np.float32))
  with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
    trained_extractor.extract(["nowhere.jpg"])


def test_rank_is_evaluations_ranking():
  rng = np.random.default_rng(0)
  gallery = rng.standard_normal((50, 8)).astype(np.float32)
  gallery[7] = gallery[3]  # a tie: the lower gallery index first, as evaluation's stable sort
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  query = gallery[[3, 10, 20]] + 0.01 * rng.standard_normal((3, 8)).astype(np.float32)
  indices, distances = inference.rank(query, gallery, topk=5, query_chunk=2)
  expected = figures.ranked_gallery(query, gallery, [0, 1, 2], np.zeros(3), np.ones(50), topk=5)
  np.testing.assert_array_equal(indices, expected)
  assert indices[0, 0] == 3 and indices[0, 1] == 7
  full = np.asarray(metrics.cosine_distance(query, gallery))
  np.testing.assert_allclose(distances, np.take_along_axis(full, indices, axis=1), atol=1e-6)
  assert inference.rank(query, gallery[:2], topk=10)[0].shape == (3, 2)


def test_saved_config_round_trip_and_overrides(trained_run):
  workdir, _, _ = trained_run
  config = saved_config.load(workdir / "config.json")
  assert config.data.image_size == (32, 16) and isinstance(config.optim.param_groups, tuple)
  assert json.loads(config.to_json_best_effort()) == json.loads((workdir / "config.json").read_text())
  # --mode eval/search/index/export reload the saved config and apply the command line's overrides on top.
  from configs import demo
  given = demo.get_config()
  reloaded = saved_config.for_workdir(given, workdir, "eval", {"eval.batch_size": 7})
  assert reloaded.data.image_size == (32, 16) and reloaded.eval.batch_size == 7 and reloaded.mode == "eval"
  assert saved_config.for_workdir(given, workdir, "train", {}) is given
  with pytest.raises(ValueError, match="no field 'widht'"):
    saved_config.apply_overrides(config, {"model.widht": 3})
  argv = saved_config.json_config_argv(["run.py", "--config", "runs/x/config.json", "--config=y.json"])
  assert argv[2].endswith("configs/from_json.py:runs/x/config.json")
  assert argv[3].startswith("--config=") and argv[3].endswith("configs/from_json.py:y.json")
