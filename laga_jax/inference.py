"""Re-id features from Python: load a trained run (or an exported model), extract, rank.

    from laga_jax.inference import FeatureExtractor, rank

    extractor = FeatureExtractor.from_workdir("runs/demo")        # its config.json + checkpoint, no optimiser
    query = extractor.extract(["me.jpg", "you.jpg"])              # (2, D) float32, L2-normalised
    gallery = extractor.extract(gallery_paths)                    # paths, PIL images or uint8 arrays
    indices, distances = rank(query, gallery, topk=10)            # (2, 10) each, nearest first

The features are evaluation's: the same decoding and resize (`data_pipelines.input_pipeline.eval_batches`
for files, `data_pipelines.augment.eval_transform` for in-memory images), the same flip-averaging and L2
normalisation (`laga_jax.evaluation.features.flip_sum_normalise`), and the ranking is evaluation's cosine
distance (`laga_jax.evaluation.metrics.cosine_distance`), nearest first, ties in gallery order.

`FeatureExtractor.from_export` runs a model written by `run.py --mode export` (the StableHLO artifact)
without the model code or the checkpoint; its input contract is uint8 pixels at the model's size, so other
sizes are resized as above and rounded back to uint8 first.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import metrics

log = logging.getLogger("laga_jax")

# ImageNet statistics of the evaluation transform (data_pipelines/augment.py), for the uint8 contract.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
METADATA_FILE = "metadata.json"
STABLEHLO_FILE = "model.stablehlo"
DEFAULT_BATCH_SIZE = 32

ImageLike = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


# --- pixels ------------------------------------------------------------------------------------------------

def normalise_pixels(images: jax.Array) -> jax.Array:
  """uint8 (N, H, W, 3) at the model's size -> the evaluation transform's float32 input (/255, ImageNet mean
  and std); the resize of `augment.eval_transform` is the identity at the model's size."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  inverse_std = 1.0 / jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) * inverse_std


def to_pixels(normalised: np.ndarray) -> np.ndarray:
  """The inverse of `normalise_pixels`, rounded to uint8: exact for images already at the model's size."""
  pixels = (np.asarray(normalised, np.float32) * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)) * 255.0
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def pixels_feature_fn(feature_fn: Callable, variables: Any) -> Callable[[jax.Array], jax.Array]:
  """uint8 (N, H, W, 3) -> (N, D) float32: normalise, then evaluation's flip-average and L2 normalisation.

  This is the contract of every exported format (`laga_jax.export`).
  """
  def serve(images):
    return features_lib.flip_sum_normalise(feature_fn, variables, normalise_pixels(images))
  return serve


def find_images(folder: Union[str, os.PathLike]) -> List[str]:
  """Image files (.jpg, .jpeg, .png, .bmp) under `folder`, recursively, sorted."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"{folder}: not a folder")
  return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class _Record:
  path: str


def _eval_data_config(image_size: Tuple[int, int]) -> ml_collections.ConfigDict:
  """The `config.data` fields the evaluation transform reads (it only resizes to `image_size`)."""
  return ml_collections.ConfigDict({
      "image_size": tuple(image_size), "resize_size": tuple(image_size), "color_jitter": (0.0, 0.0, 0.0, 0.0),
      "jitter_first": False, "erasing_p": 0.0, "num_parallel_calls": -1})


@functools.lru_cache(maxsize=None)
def _array_transform(image_size: Tuple[int, int]):
  """A traced `augment.eval_transform` for one decoded uint8 image of any size."""
  import tensorflow as tf
  from data_pipelines import augment
  settings = augment.AugmentSettings.from_config(_eval_data_config(image_size))

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  def transform(image):
    return augment.eval_transform(image, settings)
  return transform


def _as_uint8_image(image: Any, position: int) -> np.ndarray:
  """A PIL image or an array -> uint8 (H, W, 3); grey and RGBA are converted like the decoder does."""
  if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
    return np.asarray(image.convert("RGB"), np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise TypeError(f"images[{position}]: arrays must be uint8 pixels (H, W, 3), got dtype {array.dtype}")
  if array.ndim == 2:
    array = np.repeat(array[:, :, None], 3, axis=2)
  if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
    raise ValueError(f"images[{position}]: expected an (H, W, 3) image, got shape {array.shape}")
  if array.shape[2] == 1:
    array = np.repeat(array, 3, axis=2)
  return np.ascontiguousarray(array[:, :, :3])


def _image_list(images: Any) -> list:
  """One image or a sequence of them, as a list; a uint8 (N, H, W, 3) array is N images."""
  if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
    return [images]
  if isinstance(images, np.ndarray) or hasattr(images, "__array__"):
    array = np.asarray(images)
    if array.ndim == 4:
      return list(array)
    if array.ndim in (2, 3):
      return [array]
    raise ValueError(f"images: expected (N, H, W, 3) or (H, W, 3) pixels, got shape {array.shape}")
  return list(images)


def preprocessed_batches(images: Sequence[ImageLike], image_size: Tuple[int, int], batch_size: int, *,
                         data_config: Optional[ml_collections.ConfigDict] = None) -> Iterator[Tuple[np.ndarray, int]]:
  """(normalised float32 (batch_size, H, W, 3), number of real images) for `images` in order.

  Every batch has `batch_size` rows (the last is padded with zeros), so a jitted model compiles once.
  Consecutive file paths go through evaluation's own tf.data pipeline (`input_pipeline.eval_batches`);
  in-memory images through `augment.eval_transform`.
  """
  from data_pipelines import input_pipeline
  images = _image_list(images)
  data_config = data_config or _eval_data_config(image_size)
  if data_config.get("source", "files") != "files":
    # These are the caller's own files, not records of the prepared dataset a run may have trained from.
    data_config = data_config.copy_and_resolve_references()
    data_config.source = "files"
  pending: List[np.ndarray] = []

  def flush(final: bool):
    while len(pending) >= batch_size or (final and pending):
      take = pending[:batch_size]
      del pending[:batch_size]
      batch = np.stack(take)
      if len(batch) < batch_size:
        batch = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], np.float32)])
      yield batch, len(take)

  start = 0
  while start < len(images):
    end = start
    is_path = isinstance(images[start], (str, os.PathLike))
    while end < len(images) and isinstance(images[end], (str, os.PathLike)) == is_path:
      end += 1
    if is_path:
      for position in range(start, end):
        if not os.path.isfile(images[position]):
          raise FileNotFoundError(f"images[{position}]: {images[position]}: no such image file")
      records = [_Record(os.fspath(p)) for p in images[start:end]]
      for batch in input_pipeline.eval_batches(records, data_config, batch_size).as_numpy_iterator():
        pending.extend(batch["image"][batch["mask"]])
        yield from flush(False)
    else:
      transform = _array_transform(tuple(image_size))
      for position in range(start, end):
        pending.append(transform(_as_uint8_image(images[position], position)).numpy())
        yield from flush(False)
    start = end
  yield from flush(True)


# --- ranking -----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="topk")
def _top_k(query: jax.Array, gallery: jax.Array, topk: int) -> Tuple[jax.Array, jax.Array]:
  distance = metrics.cosine_distance(query, gallery)
  negative, indices = jax.lax.top_k(-distance, topk)  # ties: the lower gallery index first
  return indices, -negative


def rank(query_features: Any, gallery_features: Any, topk: int = 10, *,
         query_chunk: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
  """(indices, distances), each (Q, min(topk, G)): the nearest gallery rows of every query, nearest first.

  Cosine distance of L2-normalised features, as evaluation ranks (`metrics.cosine_distance`), ties in
  gallery order; computed on the default device `query_chunk` queries at a time.
  """
  query = np.asarray(query_features, np.float32)
  gallery = jnp.asarray(gallery_features, jnp.float32)
  if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
    raise ValueError(f"rank: expected (Q, D) and (G, D) features, got {query.shape} and {gallery.shape}")
  k = min(int(topk), gallery.shape[0])
  if k < 1:
    raise ValueError(f"rank: topk must be >= 1 and the gallery non-empty (topk={topk}, G={gallery.shape[0]})")
  indices, distances = [], []
  chunk = max(1, int(query_chunk))
  for start in range(0, len(query), chunk):
    rows = query[start:start + chunk]
    if len(rows) < chunk and len(query) > chunk:  # pad the tail: one compiled shape per run
      rows = np.concatenate([rows, np.zeros((chunk - len(rows), rows.shape[1]), np.float32)])
    i, d = _top_k(jnp.asarray(rows), gallery, k)
    n = min(chunk, len(query) - start)
    indices.append(np.asarray(i)[:n])
    distances.append(np.asarray(d)[:n])
  if not indices:
    return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
  return np.concatenate(indices).astype(np.int64), np.concatenate(distances).astype(np.float32)


# --- the extractor -----------------------------------------------------------------------------------------

def model_id(fingerprint: dict, variables: Any) -> str:
  """A short hash of the model's description and its trained arrays: features from two models with the
  same id are comparable, from different ids never."""
  digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    array = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(array.dtype).encode() + str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


class FeatureExtractor:
  """Evaluation's retrieval features for images (paths, PIL images or uint8 arrays).

  Build one with `from_workdir` (a trained run) or `from_export` (an exported model). `extract` returns
  (N, D) float32 L2-normalised features; `metadata` describes the model (`model_id`, `image_size`,
  `feature_dim`, ...), which `laga_jax.index` stores with a gallery index.
  """

  def __init__(self, *, image_size: Tuple[int, int], metadata: dict, batch_size: int = DEFAULT_BATCH_SIZE,
               normalised_fn: Optional[Callable[[np.ndarray], Any]] = None,
               pixels_fn: Optional[Callable[[np.ndarray], Any]] = None,
               data_config: Optional[ml_collections.ConfigDict] = None,
               config: Optional[ml_collections.ConfigDict] = None):
    if (normalised_fn is None) == (pixels_fn is None):
      raise ValueError("FeatureExtractor needs exactly one of normalised_fn and pixels_fn")
    self.image_size = tuple(int(v) for v in image_size)
    self.metadata = dict(metadata, image_size=list(self.image_size))
    self.batch_size = int(batch_size)
    self.config = config
    self._normalised_fn, self._pixels_fn = normalised_fn, pixels_fn
    self._data_config = data_config

  @property
  def model_id(self) -> str:
    return self.metadata["model_id"]

  @property
  def feature_dim(self) -> int:
    return int(self.metadata["feature_dim"])

  # -- construction --

  @classmethod
  def from_workdir(cls, workdir: Union[str, os.PathLike], *, config: Optional[ml_collections.ConfigDict] = None,
                   batch_size: Optional[int] = None) -> "FeatureExtractor":
    """The trained model of `workdir`: its saved `config.json` (or `config`), and its best checkpoint when
    `train.select_best` kept one, else the latest, as evaluation picks. Parameters only, no optimiser."""
    from laga_jax import checkpoint as checkpoint_lib
    from laga_jax import saved_config, trainer
    workdir = pathlib.Path(workdir).absolute()
    if config is None:
      config = saved_config.load(workdir)
    module, eval_model, variables, meta, best = trainer.load_trained_model(config, workdir, mode="inference")
    feature_fn = trainer.eval_feature_fn(module, eval_model)
    image_size = tuple(int(v) for v in config.data.image_size)
    num_classes = int(meta["fingerprint"]["num_classes"])
    fingerprint = checkpoint_lib.parameter_fingerprint(checkpoint_lib.fingerprint(config, num_classes))
    dim = jax.eval_shape(feature_fn, variables, jax.ShapeDtypeStruct((1,) + image_size + (3,), jnp.float32))
    metadata = {
        "model_id": model_id(fingerprint, variables), "model": config.model.name, "fingerprint": fingerprint,
        "feature_dim": int(dim.shape[-1]), "checkpoint": "best" if best else "latest",
        "step": int(meta.get("step", -1)), "workdir": str(workdir)}

    def normalised_fn(images):
      return features_lib.flip_sum_normalise(feature_fn, variables, images)

    extractor = cls(image_size=image_size, metadata=metadata, normalised_fn=normalised_fn,
                    batch_size=batch_size or int(config.eval.batch_size), data_config=config.data, config=config)
    extractor.variables, extractor.feature_fn, extractor.module = variables, feature_fn, module
    return extractor

  @classmethod
  def from_export(cls, path: Union[str, os.PathLike], *, batch_size: int = DEFAULT_BATCH_SIZE) -> "FeatureExtractor":
    """A model written by `run.py --mode export`: its export folder (or the `model.stablehlo` in it)."""
    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    artifact = path if path.is_file() else folder / STABLEHLO_FILE
    if not artifact.is_file():
      raise FileNotFoundError(f"{path}: no {STABLEHLO_FILE} (write one with run.py --mode export)")
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    shape = exported.in_avals[0].shape
    image_size = (int(shape[1]), int(shape[2]))
    metadata_file = folder / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    metadata.setdefault("model_id", hashlib.sha256(artifact.read_bytes()).hexdigest()[:16])
    metadata.setdefault("feature_dim", int(exported.out_avals[0].shape[-1]))
    metadata["export"] = str(folder.absolute())
    return cls(image_size=image_size, metadata=metadata, pixels_fn=exported.call, batch_size=batch_size)

  # -- extraction --

  def extract(self, images: Union[ImageLike, Sequence[ImageLike]], *, batch_size: Optional[int] = None,
              progress: bool = False) -> np.ndarray:
    """(N, D) float32 L2-normalised features of `images`, in order.

    `images`: a path, PIL image or uint8 (H, W, 3) array, a sequence of them (mixed is fine), or a uint8
    (N, H, W, 3) array. Any size: images are resized to the model's as evaluation does. Batches of
    `batch_size` (the last padded), so the model compiles once per image size and batch size.
    """
    images = _image_list(images)
    if not images:
      return np.zeros((0, self.feature_dim), np.float32)
    batch_size = int(batch_size or self.batch_size)
    out = []
    batches = preprocessed_batches(images, self.image_size, batch_size, data_config=self._data_config)
    if progress:
      from laga_jax.logging_utils import progress_iter
      batches = progress_iter(batches, total=math.ceil(len(images) / batch_size), desc="features", unit="batch")
    for batch, count in batches:
      if self._normalised_fn is not None:
        features = self._normalised_fn(jnp.asarray(batch))
      else:
        features = self._pixels_fn(jnp.asarray(to_pixels(batch)))
      out.append(np.asarray(features, np.float32)[:count])
    return np.concatenate(out)

  def extract_pixels(self, pixels: np.ndarray) -> np.ndarray:
    """(N, D) features of uint8 (N, H, W, 3) pixels at the model's size: the exported formats' contract."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.image_size + (3,):
      raise ValueError(f"extract_pixels: expected uint8 (N, {self.image_size[0]}, {self.image_size[1]}, 3), "
                       f"got {pixels.dtype} {pixels.shape}")
    if self._pixels_fn is not None:
      return np.asarray(self._pixels_fn(jnp.asarray(pixels)), np.float32)
    return np.asarray(self._normalised_fn(normalise_pixels(jnp.asarray(pixels))), np.float32)

  @staticmethod
  def rank(query_features: Any, gallery_features: Any, topk: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """`laga_jax.inference.rank`: (indices, distances) of the `topk` nearest gallery rows per query."""
    return rank(query_features, gallery_features, topk)
