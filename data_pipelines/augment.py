"""Decoding and the train/test image transforms of the paper (Section IV-B), as TensorFlow ops.

Body train: resize (bicubic) to `resize_size` -> random crop `image_size` -> flip -> colour jitter ->
normalise (ImageNet) -> random erasing. Hands (`jitter_first`): colour jitter on the decoded image first, as
the author's transform does on the PIL image. Test: resize to `image_size`, normalise.

Every random choice comes from stateless ops keyed by an explicit per-image seed (an int tensor of shape
[2]), so an image's augmentation is a pure function of its seed: resumed runs replay the same batches.
Transforms take the uint8 image `decode` returns and work in float32 [0, 1] (torchvision's `ToTensor`)
until normalisation.
"""

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's `rgb_to_grayscale` weights, used by its contrast and saturation jitter.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
ERASING_AREA = (0.02, 0.4)
ERASING_ASPECT = (0.3, 1 / 0.3)
ERASING_ATTEMPTS = 100
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # indices of the jitter factors


def hide_gpus_from_tensorflow() -> None:
  """Keep TensorFlow (which only feeds data) off every GPU so that JAX owns their memory."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TF was initialised earlier (its devices are fixed by now); whoever did that chose the devices.
    pass


hide_gpus_from_tensorflow()


def _pair(value: Any, field: str) -> tuple:
  try:
    height, width = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"config.data.{field} must be (height, width), got {value!r}") from None
  if height < 1 or width < 1:
    raise ValueError(f"config.data.{field} must be positive, got {value!r}")
  return height, width


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The `config.data` fields the transforms read, validated once."""
  image_size: tuple
  resize_size: tuple
  color_jitter: tuple   # brightness, contrast, saturation, hue (torchvision ColorJitter strengths)
  jitter_first: bool
  erasing_p: float

  @classmethod
  def from_config(cls, data_cfg: Any) -> "AugmentSettings":
    """Read and check image_size, resize_size, color_jitter, jitter_first, erasing_p."""
    image_size = _pair(data_cfg.image_size, "image_size")
    resize_size = _pair(data_cfg.resize_size, "resize_size")
    if resize_size[0] < image_size[0] or resize_size[1] < image_size[1]:
      raise ValueError(f"config.data.resize_size {resize_size} must be at least config.data.image_size "
                       f"{image_size} (the random crop is taken from the resized image)")
    jitter = tuple(float(v) for v in data_cfg.color_jitter)
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
      raise ValueError(f"config.data.color_jitter must be (brightness, contrast, saturation, hue) >= 0 with "
                       f"hue <= 0.5, got {tuple(data_cfg.color_jitter)!r}")
    erasing_p = float(data_cfg.erasing_p)
    if not 0.0 <= erasing_p <= 1.0:
      raise ValueError(f"config.data.erasing_p must be a probability in [0, 1], got {erasing_p}")
    return cls(image_size, resize_size, jitter, bool(data_cfg.jitter_first), erasing_p)


def decode(contents: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG/BMP/GIF bytes -> uint8 (h, w, 3)."""
  image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 image -> float32 in [0, 1] (torchvision `ToTensor`)."""
  return tf.cast(image, tf.float32) / 255.0


def resize(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
  """Bicubic resize to `size` (height, width), antialiased when shrinking like PIL, clipped to [0, 1]."""
  # Antialiasing changes nothing when enlarging (outputs agree to 4e-4) but its kernel is ~3x slower, and
  # Market-style 128x64 crops are always enlarged to 432x144; so it is used only when an axis shrinks.
  shrinking = tf.reduce_any(tf.shape(image)[:2] > tf.constant(size))
  image = tf.cond(shrinking, lambda: tf.image.resize(image, size, method="bicubic", antialias=True),
                  lambda: tf.image.resize(image, size, method="bicubic"))
  return tf.clip_by_value(image, 0.0, 1.0)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """ImageNet mean/std normalisation of an image in [0, 1] (static shape)."""
  # Full-size constants keep the ops elementwise: TF's CPU kernels that broadcast a per-channel vector
  # (and BiasAdd) are several times slower than same-shape arithmetic.
  shape = image.shape.as_list()
  mean = np.broadcast_to(np.float32(IMAGENET_MEAN), shape)
  inverse_std = np.broadcast_to(np.float32(1.0) / np.float32(IMAGENET_STD), shape)
  return (image - mean) * inverse_std


def random_crop(image: tf.Tensor, size: Sequence[int], seed: tf.Tensor) -> tf.Tensor:
  """A `size` window at a uniform position (torchvision RandomCrop without padding)."""
  height, width = size
  row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  top = tf.random.stateless_uniform([], row_seed, 0, shape[0] - height + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], col_seed, 0, shape[1] - width + 1, dtype=tf.int32)
  return tf.slice(image, tf.stack([top, left, 0]), [height, width, 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirror left-right with probability 0.5."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def jitter_params(strengths: Sequence[float], seed: tf.Tensor) -> tuple:
  """ColorJitter's draws: (order of the enabled adjustments, [brightness, contrast, saturation, hue] factors).

  Factors are U(max(0, 1 - s), 1 + s) and the hue shift U(-h, h); an adjustment with strength 0 is skipped.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  factors = [tf.random.stateless_uniform([], seeds[i], max(0.0, 1.0 - s), 1.0 + s)
             for i, s in enumerate(strengths[:3])]
  factors.append(tf.random.stateless_uniform([], seeds[3], -strengths[3], strengths[3]))
  enabled = tf.constant([i for i, s in enumerate(strengths) if s > 0], tf.int32)
  order = tf.gather(enabled, tf.argsort(tf.random.stateless_uniform(enabled.shape, seeds[4])))
  return order, tf.stack(factors)


def _gray_mix(factor: tf.Tensor) -> tf.Tensor:
  """3x3 matrix M with x @ M = factor * x + (1 - factor) * gray(x) in every channel."""
  to_gray = np.outer(np.float32(_GRAY_WEIGHTS), np.ones(3, np.float32))
  return factor * tf.eye(3) + (1.0 - factor) * to_gray


def _adjustments(factors: tf.Tensor, with_hue: bool) -> list:
  """torchvision's adjust_{brightness, contrast, saturation, hue} (clamped), indexed like `factors`."""
  gray = np.float32(_GRAY_WEIGHTS)
  clip = lambda x: tf.clip_by_value(x, 0.0, 1.0)
  mean_gray = lambda x: tf.tensordot(tf.reduce_mean(x, axis=[0, 1]), gray, 1)
  adjustments = [
      lambda x: clip(factors[BRIGHTNESS] * x),
      lambda x: clip(factors[CONTRAST] * x + (1.0 - factors[CONTRAST]) * mean_gray(x)),
      # One 3x3 matmul: blending with a broadcast gray channel is far slower on TF's CPU kernels.
      lambda x: clip(tf.tensordot(x, _gray_mix(factors[SATURATION]), 1)),
  ]
  if with_hue:
    adjustments.append(lambda x: tf.image.adjust_hue(x, factors[HUE]))
  return adjustments


def apply_jitter(image: tf.Tensor, order: tf.Tensor, factors: tf.Tensor, with_hue: bool = False) -> tf.Tensor:
  """Apply the adjustments drawn by `jitter_params`, in their order, to an image in [0, 1]."""
  adjustments = _adjustments(factors, with_hue)
  for position in range(order.shape[0]):
    image = tf.switch_case(order[position], [functools.partial(adjust, image) for adjust in adjustments])
  return image


def color_jitter(image: tf.Tensor, strengths: Sequence[float], seed: tf.Tensor) -> tf.Tensor:
  """torchvision ColorJitter: random factors, the enabled adjustments applied in a random order."""
  if not any(s > 0 for s in strengths):
    return image
  return apply_jitter(image, *jitter_params(strengths, seed), with_hue=strengths[HUE] > 0)


def random_erasing(image: tf.Tensor, probability: float, seed: tf.Tensor) -> tf.Tensor:
  """Zhong et al. random erasing as in the author's code: zero a random rectangle with `probability`.

  Up to 100 attempts of area U(0.02, 0.4) x image area and aspect U(0.3, 1/0.3), h = round(sqrt(area *
  aspect)), w = round(sqrt(area / aspect)); the first attempt with h < H and w < W is used. All attempts are
  drawn at once and the first valid one selected, which is the same distribution as the sequential loop.
  """
  if probability <= 0:
    return image
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  area = tf.random.stateless_uniform([ERASING_ATTEMPTS], seeds[0], *ERASING_AREA) * (height * width)
  aspect = tf.random.stateless_uniform([ERASING_ATTEMPTS], seeds[1], *ERASING_ASPECT)
  # tf.round rounds half to even, like the Python `round` of the reference implementation.
  rows = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  cols = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (rows < height) & (cols < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  erase = (tf.random.stateless_uniform([], seeds[2]) < probability) & tf.reduce_any(fits)
  rows, cols = tf.where(erase, rows[first], 0), tf.where(erase, cols[first], 0)
  top = tf.random.stateless_uniform([], seeds[3], 0, height - rows + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[4], 0, width - cols + 1, dtype=tf.int32)
  # Multiplying by a full-size mask: TF's select (and broadcasting a smaller mask) is slow on CPU.
  keep = 1.0 - tf.pad(tf.ones([rows, cols, 3]), [[top, height - top - rows], [left, width - left - cols], [0, 0]])
  return image * tf.ensure_shape(keep, image.shape)


def train_transform(image: tf.Tensor, seed: tf.Tensor, settings: AugmentSettings) -> tf.Tensor:
  """Decoded uint8 image -> augmented, normalised float32 (*image_size, 3)."""
  jitter_seed, crop_seed, flip_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  image = to_float(image)
  if settings.jitter_first:
    image = color_jitter(image, settings.color_jitter, jitter_seed)
  image = resize(image, settings.resize_size)
  image = random_crop(image, settings.image_size, crop_seed)
  image = random_flip(image, flip_seed)
  if not settings.jitter_first:
    image = color_jitter(image, settings.color_jitter, jitter_seed)
  image = normalize(image)
  return random_erasing(image, settings.erasing_p, erase_seed)


def eval_transform(image: tf.Tensor, settings: AugmentSettings) -> tf.Tensor:
  """Decoded uint8 image -> resized to image_size, normalised float32."""
  return normalize(resize(to_float(image), settings.image_size))
