"""`run.py --mode export`: SavedModel (loaded by TensorFlow alone), StableHLO and ONNX against the Python API.

Parity is measured as the largest ‖exported − API‖ / ‖API‖ over the feature rows (features are unit vectors),
on the demo's images and, when available, on real photographs of people, at the model's image size.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from laga_jax import export
from laga_jax.inference import FeatureExtractor

from conftest import run_py

TOLERANCE = 1e-4
# TensorFlow alone: no project import, no checkout on the path (python -I, run from a scratch folder).
TF_ONLY = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
serve = model.signatures["serving_default"]
spec = serve.structured_input_signature[1]["images"]
for source, target in zip(sys.argv[2::2], sys.argv[3::2]):
  out = serve(images=tf.constant(np.load(source)))["features"]
  np.savez(target, features=out.numpy(), input_shape=str(spec.shape), input_dtype=spec.dtype.name,
           project_imported=any(m.split(".")[0] in ("laga_jax", "data_pipelines", "configs") for m in sys.modules))
"""


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.linalg.norm(actual - expected, axis=1) / np.linalg.norm(expected, axis=1)))


def _pixels(paths, size) -> np.ndarray:
  """uint8 (N, H, W, 3) of the images resized (bicubic) to the model's (height, width)."""
  return np.stack([np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BICUBIC)) for p in paths])


@pytest.fixture(scope="module")
def exported(trained_run):
  """run.py --mode export with the demo config file: the workdir's saved config must be what is used."""
  workdir = trained_run[0]
  done = run_py("--config", "configs/demo.py", "--workdir", workdir, "--mode", "export")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir / "export", done


@pytest.fixture(scope="module")
def pixel_sets(trained_run, trained_extractor, request):
  """{"demo": demo query images, "real": photographs of people (if present)} as uint8 at the model's size."""
  sets = {"demo": _pixels(sorted((trained_run[1] / "query").glob("*.jpg"))[:6], trained_extractor.image_size)}
  try:
    root = request.getfixturevalue("realdata_dir")
  except pytest.skip.Exception:
    return sets
  photos = sorted(root.glob("market1501/images/**/*.jpg"))[:4] + sorted(root.glob("duke/images/**/*.jpg"))[:4]
  if photos:
    sets["real"] = _pixels(photos, trained_extractor.image_size)
  return sets


@pytest.fixture(scope="module")
def saved_model_features(exported, pixel_sets, tmp_path_factory):
  """The SavedModel's features for every pixel set, computed by TensorFlow in one separate process."""
  scratch = tmp_path_factory.mktemp("tf_only")
  files = []
  for name, pixels in pixel_sets.items():
    np.save(scratch / f"{name}.npy", pixels)
    files += [str(scratch / f"{name}.npy"), str(scratch / f"{name}_out.npz")]
  done = subprocess.run([sys.executable, "-I", "-c", TF_ONLY, str(exported[0] / "saved_model"), *files],
                        cwd=scratch, capture_output=True, text=True, timeout=600,
                        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
  assert done.returncode == 0, done.stderr[-3000:]
  return {name: dict(np.load(scratch / f"{name}_out.npz")) for name in pixel_sets}


def test_export_writes_every_format(exported, trained_extractor):
  out_dir, done = exported
  assert (out_dir / "saved_model" / "saved_model.pb").is_file()
  assert (out_dir / "model.stablehlo").stat().st_size > 1000
  meta = json.loads((out_dir / "metadata.json").read_text())
  assert meta["model_id"] == trained_extractor.model_id  # the same trained arrays as the workdir's
  assert meta["image_size"] == [32, 16] and meta["feature_dim"] == trained_extractor.feature_dim
  assert meta["contract"]["input"]["dtype"] == "uint8" and meta["platforms"] == ["cpu", "cuda", "tpu"]
  assert ("onnx" in meta["files"]) == (export.onnx_available() is None)
  assert "exported" in done.stdout
  assert "using the saved config" in done.stderr


def test_saved_model_signature_and_parity(saved_model_features, pixel_sets, trained_extractor):
  demo = saved_model_features["demo"]
  assert str(demo["input_dtype"]) == "uint8" and str(demo["input_shape"]) == "(None, 32, 16, 3)"
  assert not bool(demo["project_imported"])
  expected = trained_extractor.extract_pixels(pixel_sets["demo"])
  assert demo["features"].dtype == np.float32 and demo["features"].shape == expected.shape
  assert relative_error(demo["features"], expected) <= TOLERANCE


def test_stablehlo_parity_and_free_batch(exported, pixel_sets, trained_extractor):
  serialized = (exported[0] / "model.stablehlo").read_bytes()
  model = jax.export.deserialize(bytearray(serialized))
  assert str(model.in_avals[0].dtype) == "uint8" and model.in_avals[0].shape[1:] == (32, 16, 3)
  assert set(model.platforms) == {"cpu", "cuda", "tpu"}
  pixels = pixel_sets["demo"]
  expected = trained_extractor.extract_pixels(pixels)
  for count in (1, len(pixels)):
    assert relative_error(np.asarray(model.call(pixels[:count])), expected[:count]) <= TOLERANCE
  # ... and the API can run the exported file without the model code or the checkpoint.
  from_export = FeatureExtractor.from_export(exported[0])
  assert from_export.model_id == trained_extractor.model_id and from_export.image_size == (32, 16)
  assert relative_error(from_export.extract(list(pixels)), expected) <= TOLERANCE


def test_onnx_parity(exported, pixel_sets, trained_extractor):
  missing = export.onnx_available()
  if missing:
    pytest.skip(f"ONNX export not tested: {missing}")
  import onnxruntime
  session = onnxruntime.InferenceSession(str(exported[0] / "model.onnx"), providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == ["images"]
  assert [o.name for o in session.get_outputs()] == ["features"]
  for name, pixels in pixel_sets.items():
    expected = trained_extractor.extract_pixels(pixels)
    for count in (1, len(pixels)):
      (features,) = session.run(["features"], {"images": pixels[:count]})
      assert relative_error(features, expected[:count]) <= TOLERANCE, name


def test_real_photographs(realdata_dir, exported, pixel_sets, saved_model_features, trained_extractor):
  """Photographs of people (Market-1501, DukeMTMC-reID samples) through every format."""
  if "real" not in pixel_sets:
    pytest.skip(f"no person photographs under {realdata_dir}")
  pixels = pixel_sets["real"]
  expected = trained_extractor.extract_pixels(pixels)
  assert relative_error(saved_model_features["real"]["features"], expected) <= TOLERANCE
  model = jax.export.deserialize(bytearray((exported[0] / "model.stablehlo").read_bytes()))
  assert relative_error(np.asarray(model.call(pixels)), expected) <= TOLERANCE
  # The API on the photographs at any size: resized by evaluation's transform, then the model.
  originals = sorted(realdata_dir.glob("market1501/images/**/*.jpg"))[:2]
  features = trained_extractor.extract([str(p) for p in originals])
  assert features.shape == (len(originals), trained_extractor.feature_dim)
