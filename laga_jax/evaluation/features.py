"""Evaluation features: model(image) + model(flipped image), L2-normalised, over padded eval batches.

Batches are dicts {"image" (B, H, W, 3) float32, "mask" (B,) bool, "index" (B,) int} whose tail is padded
(mask False), as `data_pipelines.input_pipeline.eval_batches` yields them. With several devices the batch
is split over the mesh axis "data"; the features come back in `index` order, every image exactly once.
"""

import functools
import os
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from laga_jax.parallel import DATA_AXIS, make_mesh

FeatureFn = Callable[[Any, jax.Array], jax.Array]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("flip",))
def flip_sum_normalise(feature_fn: FeatureFn, variables: Any, images: jax.Array, flip: bool = True) -> jax.Array:
  """L2-normalise feature_fn(images) + feature_fn(images flipped along the width), as the author does
  (`flip=False`: the image's feature alone, as e.g. BoT's reference evaluates)."""
  summed = feature_fn(variables, images)
  if flip:
    summed = summed + feature_fn(variables, images[:, :, ::-1, :])
  norm = jnp.linalg.norm(summed, axis=-1, keepdims=True)
  return summed / jnp.maximum(norm, 1e-12)


def _check_batch(number: int, batch: Mapping[str, Any]) -> tuple:
  missing = {"image", "mask", "index"} - set(batch)
  if missing:
    raise ValueError(f"batch {number}: missing key(s) {sorted(missing)}; expected image, mask and index")
  image, mask, index = np.asarray(batch["image"]), np.asarray(batch["mask"]), np.asarray(batch["index"])
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f"batch {number}: image must be (B, H, W, 3), got shape {image.shape}")
  if mask.shape != image.shape[:1] or index.shape != image.shape[:1]:
    raise ValueError(f"batch {number}: mask {mask.shape} and index {index.shape} must be ({image.shape[0]},) "
                     "like the images")
  return image.astype(np.float32), mask.astype(bool), index.astype(np.int64)


def _default_mesh() -> Optional[Mesh]:
  devices = jax.local_devices()
  return make_mesh(devices) if len(devices) > 1 else None


def extract_features(feature_fn: FeatureFn, variables: Any, batches: Iterable[Mapping[str, Any]], *,
                     num_images: Optional[int] = None, mesh: Optional[Mesh] = None,
                     flip: bool = True) -> np.ndarray:
  """(N, D) float32 features of every image, row i for index i (flip-averaged unless `flip=False`).

  `feature_fn(variables, images_nhwc) -> (B, D)` gives the model's un-normalised eval features. `mesh`
  defaults to all local devices (none when there is one); each batch is padded to a multiple of its size.
  A mesh spanning several processes takes this process's share of every batch and returns every feature.
  Raises if an index is missing, repeated, or (with `num_images`) out of range.
  """
  mesh = _default_mesh() if mesh is None else mesh
  num_devices = 1 if mesh is None else mesh.devices.size
  # A mesh over several processes: each batch holds this process's rows (eval_batches' `process_index`),
  # each process extracts its own share, and every process gets all the features back.
  processes = jax.process_count() if mesh is not None else 1
  if mesh is not None:
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
  features, indices = [], []
  for number, batch in enumerate(batches):
    image, mask, index = _check_batch(number, batch)
    pad = -len(image) % (num_devices // processes)
    if pad:
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], image.dtype)])
      mask, index = np.concatenate([mask, np.zeros(pad, bool)]), np.concatenate([index, np.full(pad, -1)])
    if processes > 1:
      from jax.experimental import multihost_utils
      image = jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)), image)
      out = multihost_utils.process_allgather(flip_sum_normalise(feature_fn, variables, image, flip=flip),
                                              tiled=True)
      mask, index = (np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in (mask, index))
    else:
      if mesh is not None:
        image = jax.device_put(image, NamedSharding(mesh, P(DATA_AXIS)))
      out = flip_sum_normalise(feature_fn, variables, image, flip=flip)
    out = np.asarray(out)
    features.append(out[mask])
    indices.append(index[mask])
  if not features:
    raise ValueError("batches: no batch given")
  features, indices = np.concatenate(features), np.concatenate(indices)
  return _in_index_order(features, indices, num_images)


def _in_index_order(features: np.ndarray, indices: np.ndarray, num_images: Optional[int]) -> np.ndarray:
  """Rows reordered by index, after checking the indices are exactly 0..N-1."""
  expected = len(indices) if num_images is None else num_images
  counts = np.bincount(indices[(indices >= 0) & (indices < expected)], minlength=expected)
  outside = indices[(indices < 0) | (indices >= expected)]
  if len(outside) or (counts != 1).any():
    raise ValueError(
        f"batches: expected every image index 0..{expected - 1} exactly once; "
        f"missing {np.flatnonzero(counts == 0)[:10].tolist()}, repeated {np.flatnonzero(counts > 1)[:10].tolist()}, "
        f"out of range {outside[:10].tolist()} (first 10 of each)")
  order = np.empty(expected, np.int64)
  order[indices] = np.arange(len(indices))
  return features[order]


def save_features(path: str, **arrays: Any) -> None:
  """Write `arrays` (e.g. features, pids, camids, paths) to an .npz, so evaluation can re-run without the model."""
  if "features" not in arrays:
    raise ValueError("save_features: a 'features' array is required")
  length = len(arrays["features"])
  for name, value in arrays.items():
    if len(value) != length:
      raise ValueError(f"save_features: {name} has {len(value)} rows, features has {length}")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  # Strings as unicode arrays, so loading needs no pickle.
  np.savez(path, **{name: np.asarray(value) if name != "paths" else np.asarray(value, dtype=str)
                    for name, value in arrays.items()})


def load_features(path: str) -> dict:
  """The arrays `save_features` wrote, as a dict of NumPy arrays."""
  with np.load(path, allow_pickle=False) as data:
    return {name: data[name] for name in data.files}
