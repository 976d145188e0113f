"""The per-device train step under pmap, shard_map and one device; exact resume; checkpoint safety."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from laga_jax import checkpoint as checkpoint_lib
from laga_jax import config_utils, parallel, xla_options
from laga_jax import train as train_lib
from laga_jax.models import laga_net

NUM_CLASSES = 4
IMAGE = (64, 32)


def tiny_config():
  config = base.get_config()
  config.model.stage_sizes = (1, 1, 1, 1)
  config.model.width = 8
  config.model.reduction_dim = 16
  config.model.dropout = 0.0  # dropout masks are per device; the equivalence is exact without them
  config.data.image_size = IMAGE
  config.data.resize_size = (72, 36)
  config.data.p, config.data.k = 4, 2
  return config


@pytest.fixture(scope="module")
def setup():
  config = tiny_config()
  model = laga_net.from_config(config.model, NUM_CLASSES, bn_axis_name=parallel.DATA_AXIS)
  plain = laga_net.from_config(config.model, NUM_CLASSES)
  variables = jax.device_get(jax.jit(lambda r: plain.init(r, jnp.zeros((1,) + IMAGE + (3,)), train=False))(
      jax.random.PRNGKey(0)))
  # Plain SGD: Adam would turn the float-rounding noise of gradients that are zero in exact arithmetic
  # (a Dense bias before BatchNorm) into full-size updates and hide what is compared here.
  tx = optax.sgd(0.05)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.standard_normal((8,) + IMAGE + (3,)).astype(np.float32),
              "label": np.repeat(rng.permutation(NUM_CLASSES), 2).astype(np.int32)} for _ in range(3)]
  return config, model, plain, variables, tx, batches


def _trajectory(state, step_fn, batches, place=lambda b: b):
  """States (as host arrays) and metrics after each step."""
  out = []
  for batch in batches:
    state, metrics = step_fn(state, place(batch))
    out.append((jax.device_get(state), jax.device_get(metrics)))
  return out


@pytest.fixture(scope="module")
def single_device_result(setup):
  config, _, plain, variables, tx, batches = setup
  state = train_lib.create_train_state(plain, tx, variables, jax.random.PRNGKey(1))
  # Compiled as DataParallel compiles its steps (laga_jax.xla_options), so both run the same CPU kernels.
  options = xla_options.compiler_options(jax.default_backend())
  return _trajectory(state, jax.jit(train_lib.make_train_step(config.loss, axis_name=None),
                                    compiler_options=options), batches)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_data_parallel_equals_one_device(setup, single_device_result, mode):
  """2 devices × 4 images take the step of 1 device × 8 images (sync BN, triplet mined over the global batch)."""
  config, model, _, variables, tx, batches = setup
  assert jax.local_device_count() >= 2, "conftest.py forces 2 host devices"
  dp = parallel.DataParallel(mode, jax.local_devices()[:2])
  state = dp.replicate(train_lib.create_train_state(model, tx, variables, jax.random.PRNGKey(1)))
  result = _trajectory(state, dp.compile(train_lib.make_train_step(config.loss)), batches, dp.shard_batch)

  (state1, _), (ref1, _) = result[0], single_device_result[0]
  init = _leaves(variables["params"])
  ref_params = _leaves(ref1.params)
  moved = 0
  for name, leaf in _leaves(state1.params).items():
    if "reduction']['bias" in name:
      continue  # A Dense bias right before BatchNorm has zero gradient; only rounding noise moves it.
    update = np.abs(ref_params[name] - init[name]).max()
    moved += update > 0
    assert np.abs(leaf - ref_params[name]).max() <= 1e-3 * update + 1e-7, name
  assert moved > 50, "the first step moved too few parameters for the comparison to mean anything"
  # BatchNorm statistics: their error is relative to the size of the step's change of each statistic, not
  # to each element (a channel whose mean is ~0 carries the rounding of the others), as for the parameters.
  ref_stats = _leaves(ref1.batch_stats)
  init_stats = _leaves(variables["batch_stats"])
  for name, leaf in _leaves(state1.batch_stats).items():
    update = np.abs(ref_stats[name] - init_stats[name]).max()
    assert np.abs(leaf - ref_stats[name]).max() <= 1e-4 * update + 1e-7, name
  # Later steps: the losses follow the same trajectory. (Parameters drift apart slowly because batch-hard
  # mining turns rounding differences into different hardest pairs, so they are not compared bit-wise.)
  # The first two losses agree to ~1e-7. The third inherits two steps of amplified rounding: after step 2,
  # sam4's gamma already differs by 5x its own update, whichever way the convolution weight gradients are
  # summed; with XLA's, which sum 4 and 8 images in different orders, the third triplet loss differed by
  # 3e-3 (pmap) and 4.8e-3 (shard_map) on an AVX-512 Xeon. The second loss (the loss moves by 2e-3 a step)
  # is what catches a step that loses or misplaces the state.
  for i, ((state, metrics), (ref_state, ref_metrics)) in enumerate(zip(result, single_device_result)):
    assert int(state.step) == int(ref_state.step)
    for name in ("loss", "ce", "triplet", "accuracy"):
      np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-4 if i < 2 else 1e-2, err_msg=name)


def test_shard_batch_rejects_indivisible_batch(setup):
  dp = parallel.DataParallel("shard_map", jax.local_devices()[:2])
  with pytest.raises(ValueError, match="not divisible by the 2 devices"):
    dp.shard_batch({"image": np.zeros((3, 4, 4, 3), np.float32)})


def test_unknown_parallel_mode():
  with pytest.raises(ValueError, match="config.train.parallel='dp'"):
    parallel.DataParallel("dp", jax.local_devices())


# --- checkpoints -------------------------------------------------------------------------------------------

def _tree(value: float) -> dict:
  return {"step": jnp.asarray(int(value)), "params": {"w": jnp.full((2, 3), value)}, "rng": jax.random.PRNGKey(0)}


def test_checkpoint_keeps_latest_and_best(tmp_path):
  fp = checkpoint_lib.fingerprint(tiny_config(), NUM_CLASSES)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), fp, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _tree(step), {"epoch": step}, best=step == 2)
  assert ckpt.latest_step() == 3 and ckpt.best_step() == 2
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
  restored, meta = ckpt.restore(_tree(0))
  np.testing.assert_array_equal(restored["params"]["w"], np.full((2, 3), 3.0))
  assert meta["epoch"] == 3
  best, best_meta = ckpt.restore(_tree(0), best=True)
  np.testing.assert_array_equal(best["params"]["w"], np.full((2, 3), 2.0))
  ckpt.close()


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
  """A save that died half-way (orbax's temporary folder, never renamed) is ignored on restore."""
  fp = checkpoint_lib.fingerprint(tiny_config(), NUM_CLASSES)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), fp, keep=2)
  ckpt.save(5, _tree(5), {"epoch": 1})
  ckpt.close()
  partial = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567890"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), fp, keep=2)
  assert ckpt.latest_step() == 5
  restored, _ = ckpt.restore(_tree(0))
  np.testing.assert_array_equal(restored["params"]["w"], np.full((2, 3), 5.0))
  ckpt.close()


def test_checkpoint_from_another_model_is_refused(tmp_path):
  config = tiny_config()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), checkpoint_lib.fingerprint(config, NUM_CLASSES))
  ckpt.save(1, _tree(1), {"epoch": 0})
  ckpt.close()
  config.model.width = 16
  other = checkpoint_lib.Checkpointer(str(tmp_path), checkpoint_lib.fingerprint(config, NUM_CLASSES + 1))
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as info:
    other.restore(_tree(0))
  message = str(info.value)
  assert "model.width: checkpoint has 8, config has 16" in message
  assert "num_classes: checkpoint has 4, config has 5" in message
  other.close()


# --- config checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("model.rpe", "diag", "--config.model.rpe='diag': expected one of 'diagonal', 'axial', 'none'"),
    ("train.parallel", "ddp", "--config.train.parallel='ddp'"),
    ("data.image_size", (384,), "--config.data.image_size=(384,): expected (height, width)"),
    ("data.name", "market", "--config.data.name='market': expected one of"),
    ("model.pretrained", "/nonexistent/r50.pth", "--config.model.pretrained='/nonexistent/r50.pth'"),
])
def test_config_errors_name_the_field(field, value, expected):
  config = base.get_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_utils.ConfigError) as info:
    config_utils.validate_config(config)
  assert expected in str(info.value)


def test_triplet_needs_two_images_per_identity():
  config = base.get_config()
  config.data.k = 1
  with pytest.raises(config_utils.ConfigError, match=r"data.k=1.*triplet.weight=0"):
    config_utils.validate_config(config)
  config.loss.triplet.weight = 0.0
  config_utils.validate_config(config)
