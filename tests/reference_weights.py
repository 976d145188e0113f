"""Deterministic synthetic weights shared by a PyTorch reference (fixture generation) and the JAX tests.

Rival models' fixtures store no weights: both sides rebuild the same state dict from its keys and shapes, so a
fixture holds only inputs, keys, shapes and outputs (kilobytes instead of a ResNet's 100 MB). Plain NumPy,
importable from a torch environment and from the test suite alike.
"""

import zlib
from typing import Dict, Mapping, Sequence

import numpy as np


def _rng(key: str, seed: int) -> np.random.Generator:
  # Keyed by name, not by position: adding or reordering modules leaves every other tensor unchanged.
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def synthetic_tensor(key: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  """One float32 tensor for state-dict entry `key` (He-scaled weights, BN statistics near 1 / 0)."""
  shape = tuple(int(s) for s in shape)
  rng = _rng(key, seed)
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if leaf == "running_var":
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if leaf == "running_mean":
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  if len(shape) <= 1:
    if leaf == "weight":       # BatchNorm / LayerNorm scale
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)   # biases and other vectors
  fan_in = int(np.prod(shape[1:]))
  return (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)


def synthetic_state_dict(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> Dict[str, np.ndarray]:
  """{key: tensor} for every key of `shapes` (a torch `state_dict()`'s keys and shapes)."""
  return {key: synthetic_tensor(key, shape, seed) for key, shape in shapes.items()}
