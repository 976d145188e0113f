"""Image transforms: torchvision semantics, bounds of the random choices, determinism in the seed."""

import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import augment

GRAY = np.array([0.2989, 0.587, 0.114], np.float32)


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(image_size=(32, 16), resize_size=(36, 18),
                                       color_jitter=(0.1, 0.1, 0.1, 0.0), jitter_first=False, erasing_p=0.5))
  cfg.update(overrides)
  return cfg


def seed(i: int) -> tf.Tensor:
  return tf.constant([i, 7], tf.int64)


def texture(height: int, width: int, rng_seed: int = 0) -> np.ndarray:
  """A uint8 RGB image with edges and fine detail (so resampling choices show)."""
  rng = np.random.default_rng(rng_seed)
  y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
  waves = lambda: np.sin(2 * np.pi * (rng.uniform(1, 12) * y + rng.uniform(1, 12) * x + rng.random()))
  channels = [waves() for _ in range(3)]
  image = 0.5 + 0.35 * np.stack(channels, -1) + 0.15 * ((y > 0.5) ^ (x > 0.3))[..., None]
  return np.clip(image * 255, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, fmt)
  return buffer.getvalue()


@pytest.mark.parametrize("field, value, message", [
    ("resize_size", (30, 18), "resize_size"),
    ("image_size", (32,), "image_size"),
    ("image_size", (0, 16), "image_size"),
    ("color_jitter", (0.1, 0.1, -0.1, 0.0), "color_jitter"),
    ("color_jitter", (0.1, 0.1, 0.1, 0.6), "color_jitter"),
    ("erasing_p", 1.5, "erasing_p"),
])
def test_bad_settings_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    augment.AugmentSettings.from_config(data_config(**{field: value}))


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_lossless_formats_decode_exactly(fmt):
  image = texture(20, 12)
  np.testing.assert_array_equal(augment.decode(encode(image, fmt)).numpy(), image)


def test_decode_gray_jpeg_gives_three_channels():
  gray = Image.fromarray(texture(20, 12)[..., 0])
  buffer = io.BytesIO()
  gray.save(buffer, "JPEG")
  decoded = augment.decode(buffer.getvalue())
  assert decoded.shape == (20, 12, 3) and decoded.dtype == tf.uint8


@pytest.mark.parametrize("source, target", [((32, 16), (72, 36)), ((120, 90), (40, 30))])
def test_resize_matches_pil_bicubic(source, target):
  image = texture(*source)
  ours = augment.resize(augment.to_float(image), target).numpy()
  pil = np.asarray(Image.fromarray(image).resize(target[::-1], Image.Resampling.BICUBIC), np.float32) / 255
  # PIL rounds to uint8; bilinear, or bicubic without antialiasing when shrinking, is ~10x further off.
  assert np.abs(ours - pil).mean() < 0.004 and np.abs(ours - pil).max() < 0.06
  assert ours.min() >= 0 and ours.max() <= 1


def test_normalize_constant_image():
  value = np.array([0.2, 0.5, 0.9], np.float32)
  out = augment.normalize(tf.constant(np.broadcast_to(value, (4, 3, 3)))).numpy()
  expected = (value - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(out, np.broadcast_to(expected, (4, 3, 3)), rtol=1e-6, atol=1e-6)


def test_random_crop_is_a_window_within_bounds_and_reaches_every_offset():
  # Pixel values encode their coordinates, so each crop reveals where it was taken.
  rows, cols = np.mgrid[0:6, 0:5]
  image = tf.constant(np.stack([rows, cols, rows * 0], -1), tf.float32)
  offsets = set()
  for i in range(120):
    crop = augment.random_crop(image, (4, 3), seed(i)).numpy()
    top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
    np.testing.assert_array_equal(crop, image.numpy()[top:top + 4, left:left + 3])
    offsets.add((top, left))
  assert offsets == {(t, l) for t in range(3) for l in range(3)}


def test_random_flip_mirrors_half_the_time_and_is_seeded():
  image = tf.constant(texture(6, 5), tf.float32)
  flipped = 0
  for i in range(100):
    out = augment.random_flip(image, seed(i)).numpy()
    mirrored = np.array_equal(out, image.numpy()[:, ::-1])
    assert mirrored or np.array_equal(out, image.numpy())
    flipped += mirrored
    np.testing.assert_array_equal(out, augment.random_flip(image, seed(i)).numpy())
  assert 30 <= flipped <= 70


def reference_jitter(image: np.ndarray, order, factors) -> np.ndarray:
  """torchvision's float-tensor adjust_brightness/contrast/saturation, one after another."""
  for op in order:
    f = factors[op]
    if op == augment.BRIGHTNESS:
      image = np.clip(f * image, 0, 1)
    elif op == augment.CONTRAST:
      image = np.clip(f * image + (1 - f) * (image @ GRAY).mean(), 0, 1)
    else:
      image = np.clip(f * image + (1 - f) * (image @ GRAY)[..., None], 0, 1)
  return image


def test_color_jitter_matches_torchvision_semantics():
  image = augment.to_float(texture(10, 8)).numpy()
  strengths = (0.4, 0.4, 0.4, 0.0)
  orders = set()
  for i in range(60):
    order, factors = (t.numpy() for t in augment.jitter_params(strengths, seed(i)))
    assert sorted(order) == [0, 1, 2]
    assert np.all((factors[:3] >= 0.6) & (factors[:3] <= 1.4)) and factors[3] == 0
    orders.add(tuple(order))
    ours = augment.color_jitter(tf.constant(image), strengths, seed(i)).numpy()
    np.testing.assert_allclose(ours, reference_jitter(image, order, factors), atol=2e-6)
  assert len(orders) == 6  # all orders occur


def test_color_jitter_skips_disabled_adjustments():
  image = tf.constant(augment.to_float(texture(10, 8)))
  assert augment.color_jitter(image, (0, 0, 0, 0), seed(0)) is image
  order, _ = augment.jitter_params((0.0, 0.3, 0.0, 0.0), seed(1))
  np.testing.assert_array_equal(order.numpy(), [augment.CONTRAST])


def test_hue_jitter_shifts_hue_within_range():
  image = tf.constant(augment.to_float(texture(10, 8)))
  order, factors = augment.jitter_params((0.0, 0.0, 0.0, 0.2), seed(3))
  assert order.numpy().tolist() == [augment.HUE] and abs(float(factors[augment.HUE])) <= 0.2
  expected = tf.image.adjust_hue(image, factors[augment.HUE])
  np.testing.assert_allclose(augment.color_jitter(image, (0.0, 0.0, 0.0, 0.2), seed(3)), expected, atol=1e-6)


def erased_box(image: np.ndarray, out: np.ndarray):
  """(rows, cols) of the zeroed rectangle, after checking nothing else changed; None when nothing was erased."""
  zero = np.all(out == 0, axis=-1)
  np.testing.assert_array_equal(out[~zero], image[~zero])
  if not zero.any():
    return None
  rows, cols = np.nonzero(zero.any(axis=1))[0], np.nonzero(zero.any(axis=0))[0]
  assert zero[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and zero.sum() == len(rows) * len(cols)
  return len(rows), len(cols)


def test_random_erasing_rectangles_follow_the_reference_ranges():
  height, width = 64, 32
  image = np.full((height, width, 3), 0.7, np.float32)
  erase = tf.function(lambda x, s: augment.random_erasing(x, 1.0, s))
  areas = []
  for i in range(150):
    box = erased_box(image, erase(tf.constant(image), seed(i)).numpy())
    assert box is not None  # with a 64x32 image an attempt always fits, so p=1 always erases
    rows, cols = box
    assert rows < height and cols < width
    # h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)): area within rounding of [0.02, 0.4].
    slack = 0.5 * (rows + cols) + 0.25
    assert 0.02 * height * width - slack <= rows * cols <= 0.4 * height * width + slack
    areas.append(rows * cols / (height * width))
  assert min(areas) < 0.08 and max(areas) > 0.3


def test_random_erasing_probability():
  image = tf.fill([32, 16, 3], 0.5)
  erase = tf.function(lambda x, s: augment.random_erasing(x, 0.5, s))
  erased = sum(erased_box(image.numpy(), erase(image, seed(i)).numpy()) is not None for i in range(200))
  assert 70 <= erased <= 130
  assert augment.random_erasing(image, 0.0, seed(0)) is image


def test_train_transform_shapes_determinism_and_constant_image():
  settings = augment.AugmentSettings.from_config(data_config())
  image = tf.constant(texture(40, 20))
  a = augment.train_transform(image, seed(1), settings).numpy()
  assert a.shape == (32, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, augment.train_transform(image, seed(1), settings).numpy())
  assert not np.array_equal(a, augment.train_transform(image, seed(2), settings).numpy())
  # Without jitter and erasing a constant image stays constant through resize, crop and flip.
  plain = augment.AugmentSettings.from_config(data_config(color_jitter=(0, 0, 0, 0), erasing_p=0.0))
  value = np.array([40, 120, 230], np.uint8)
  out = augment.train_transform(tf.constant(np.broadcast_to(value, (40, 20, 3))), seed(5), plain).numpy()
  expected = (value / 255 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_hand_transform_jitters_first_on_any_input_size():
  settings = augment.AugmentSettings.from_config(
      data_config(image_size=(24, 24), resize_size=(27, 27), jitter_first=True, erasing_p=0.0))
  # One trace with a dynamic input shape, as inside a tf.data map over images of varying sizes.
  transform = tf.function(lambda image, s: augment.train_transform(image, s, settings),
                          input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64)])
  for shape in [(50, 40), (31, 60)]:
    out = transform(tf.constant(texture(*shape)), seed(0)).numpy()
    assert out.shape == (24, 24, 3) and np.isfinite(out).all()


def test_eval_transform_is_resize_and_normalize():
  settings = augment.AugmentSettings.from_config(data_config())
  image = tf.constant(texture(40, 20))
  out = augment.eval_transform(image, settings).numpy()
  expected = augment.normalize(augment.resize(augment.to_float(image), (32, 16))).numpy()
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(out, augment.eval_transform(image, settings).numpy())
