"""Feature extraction over padded batches (flip-sum, L2 norm, index order, sharding) and the .npz round trip."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laga_jax.evaluation import features as features_lib
from laga_jax.parallel import make_mesh

H, W, D = 6, 4, 5


def linear_fn(variables, images):
  return images.reshape(images.shape[0], -1) @ variables["w"]


def expected_features(images, w):
  flat = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
  summed = flat(images) @ w + flat(images[:, :, ::-1]) @ w
  return summed / np.linalg.norm(summed, axis=1, keepdims=True)


def make_batches(images, batch_size, order):
  """Eval batches in `order`, the last one padded with zero images, mask False and index -1."""
  batches = []
  for lo in range(0, len(order), batch_size):
    index = order[lo:lo + batch_size]
    pad = batch_size - len(index)
    batches.append({"image": np.concatenate([images[index], np.zeros((pad, H, W, 3), np.float32)]),
                    "mask": np.arange(batch_size) < len(index),
                    "index": np.concatenate([index, -np.ones(pad, np.int64)])})
  return batches


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(11, H, W, 3)).astype(np.float32)
  w = rng.normal(size=(H * W * 3, D)).astype(np.float32)
  return images, w


@pytest.mark.parametrize("batch_size", [3, 4, 11])
def test_flip_sum_normalised_in_index_order(data, batch_size):
  images, w = data
  order = np.random.default_rng(batch_size).permutation(len(images))
  got = features_lib.extract_features(linear_fn, {"w": w}, make_batches(images, batch_size, order),
                                      num_images=len(images))
  assert got.shape == (11, D) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected_features(images, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-6)


def test_flip_is_along_the_width(data):
  images, w = data
  mirrored = features_lib.extract_features(linear_fn, {"w": w}, make_batches(images[:, :, ::-1], 4,
                                                                             np.arange(11)))
  plain = features_lib.extract_features(linear_fn, {"w": w}, make_batches(images, 4, np.arange(11)))
  np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-6)
  upside_down = features_lib.extract_features(linear_fn, {"w": w}, make_batches(images[:, ::-1], 4,
                                                                                np.arange(11)))
  assert np.abs(upside_down - plain).max() > 1e-2


def test_sharded_over_two_devices_equals_one_device(data):
  assert len(jax.local_devices()) >= 2, "conftest forces 2 host devices"
  images, w = data
  batches = make_batches(images, 3, np.arange(11))    # 3 rows per batch: padded to 4 for 2 devices
  one = features_lib.extract_features(linear_fn, {"w": w}, batches, mesh=make_mesh(jax.local_devices()[:1]))
  two = features_lib.extract_features(linear_fn, {"w": w}, batches, mesh=make_mesh(jax.local_devices()[:2]))
  default = features_lib.extract_features(linear_fn, {"w": w}, batches)
  np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(default, two)


class TinyConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(D)(x.mean(axis=(1, 2)))


def test_flax_conv_model(data):
  images, _ = data
  model = TinyConvNet()
  rng = np.random.default_rng(1)
  # Variables drawn directly: compiling flax's initialisers costs seconds on CPU.
  variables = {"params": {
      "Conv_0": {"kernel": rng.normal(size=(3, 3, 3, 8)).astype(np.float32), "bias": np.zeros(8, np.float32)},
      "Dense_0": {"kernel": rng.normal(size=(8, D)).astype(np.float32), "bias": np.zeros(D, np.float32)}}}
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, H, W, 3))))
  got = features_lib.extract_features(model.apply, variables, make_batches(images, 4, np.arange(11)))
  both = np.asarray(jax.jit(model.apply)(variables, np.concatenate([images, images[:, :, ::-1]])), np.float64)
  summed = both[:11] + both[11:]
  np.testing.assert_allclose(got, summed / np.linalg.norm(summed, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_missing_repeated_and_bad_batches_are_reported(data):
  images, w = data
  variables = {"w": w}
  dropped = make_batches(images, 4, np.arange(10))
  with pytest.raises(ValueError, match=r"missing \[10\]"):
    features_lib.extract_features(linear_fn, variables, dropped, num_images=11)
  repeated = make_batches(images, 4, np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3]))
  with pytest.raises(ValueError, match=r"repeated \[3\]"):
    features_lib.extract_features(linear_fn, variables, repeated, num_images=11)
  one_too_many = make_batches(np.concatenate([images, images[:1]]), 4, np.arange(12))
  with pytest.raises(ValueError, match=r"out of range \[11\]"):
    features_lib.extract_features(linear_fn, variables, one_too_many, num_images=11)
  with pytest.raises(ValueError, match="batch 0: image must be"):
    features_lib.extract_features(linear_fn, variables, [{"image": images[0], "mask": [True], "index": [0]}])
  with pytest.raises(ValueError, match="missing key"):
    features_lib.extract_features(linear_fn, variables, [{"image": images}])


def test_save_and_load_round_trip(tmp_path, data):
  images, w = data
  feats = features_lib.extract_features(linear_fn, {"w": w}, make_batches(images, 4, np.arange(11)))
  paths = [f"/data/img_{i}.jpg" for i in range(11)]
  target = tmp_path / "sub" / "gallery.npz"
  features_lib.save_features(str(target), features=feats, pids=np.arange(11), camids=np.zeros(11, int),
                             paths=paths)
  loaded = features_lib.load_features(str(target))
  np.testing.assert_array_equal(loaded["features"], feats)
  np.testing.assert_array_equal(loaded["pids"], np.arange(11))
  assert loaded["paths"].tolist() == paths
  with pytest.raises(ValueError, match="pids has 3 rows"):
    features_lib.save_features(str(target), features=feats, pids=np.arange(3))
