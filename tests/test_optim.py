"""Learning-rate schedule (fixture, all 70 epochs), parameter groups and one Adam + coupled-L2 update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from laga_jax import optim
from laga_jax.models import laga_net


@pytest.fixture(scope="module")
def cfg():
  return base.get_config().optim


@pytest.fixture(scope="module")
def lr_fixture(fixtures_dir):
  return np.load(fixtures_dir / "laga_lr_schedule.npz")


def test_learning_rate_matches_fixture_for_all_70_epochs(cfg, lr_fixture):
  epochs = lr_fixture["epoch"]
  assert len(epochs) == 70
  new = [optim.learning_rate(int(e), cfg) for e in epochs]
  np.testing.assert_allclose(new, lr_fixture["lr_new_layers"], rtol=1e-6)
  rates = [optim.current_learning_rates(cfg, int(e), steps_per_epoch=1) for e in epochs]
  np.testing.assert_allclose([r["new"] for r in rates], lr_fixture["lr_new_layers"], rtol=1e-6)
  np.testing.assert_allclose([r["backbone"] for r in rates], lr_fixture["lr_backbone"], rtol=1e-6)


def test_schedule_is_constant_within_each_epoch(cfg, lr_fixture):
  steps_per_epoch = 3
  schedule = jax.jit(jax.vmap(optim.make_schedule(cfg, steps_per_epoch)))
  steps = np.arange(70 * steps_per_epoch + 30)  # and one epoch past the end: the last LR stays
  expected = np.repeat(lr_fixture["lr_new_layers"], steps_per_epoch)
  expected = np.concatenate([expected, np.full(30, expected[-1])])
  np.testing.assert_allclose(schedule(steps), expected, rtol=1e-6)


@pytest.mark.parametrize("step, epoch", [(0, 0), (4, 0), (5, 1), (49, 9), (50, 10), (199, 39), (200, 40),
                                         (299, 59), (300, 60), (349, 69)])
def test_step_to_epoch_at_boundaries(cfg, step, epoch):
  lr = float(optim.make_schedule(cfg, steps_per_epoch=5)(jnp.asarray(step)))
  np.testing.assert_allclose(lr, optim.learning_rate(epoch, cfg), rtol=1e-6)
  assert optim.current_learning_rates(cfg, step, 5)["new"] == optim.learning_rate(epoch, cfg)


def test_schedule_errors_name_the_field(cfg):
  with pytest.raises(ValueError, match=r"steps_per_epoch=0 \(config.train.steps_per_epoch\)"):
    optim.make_schedule(cfg, 0)
  bad = base.get_config().optim
  bad.decay_epochs = (5, 60)
  with pytest.raises(ValueError, match=r"config.optim.decay_epochs=\(5, 60\)"):
    optim.make_optimizer(bad, 10)


# --- parameter groups -----------------------------------------------------------------------------------------

def _laga_like_params():
  leaf = np.ones((2,), np.float32)
  return {
      "backbone": {"conv1": {"kernel": leaf}, "bn1": {"scale": leaf, "bias": leaf},
                   "layer3_0": {"conv1": {"kernel": leaf}}},
      "layer4_global": {"block_0": {"conv1": {"kernel": leaf}}},
      "layer4_spatial": {"block_0": {"bn3": {"scale": leaf}}},
      "sam_rpe_3": {"query": {"conv": {"kernel": leaf}}, "rel_height": leaf, "gamma": leaf},
      "cam_4": {"gamma": leaf},
      "head_global": {"reduction": {"kernel": leaf}, "classifier": {"bias": leaf}},
  }


def test_param_labels_on_laga_like_tree(cfg):
  labels = optim.param_labels(_laga_like_params(), cfg, laga_net.BACKBONE_PATTERN)
  flat = {jax.tree_util.keystr(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}
  assert len(flat) == 12
  for path, label in flat.items():
    expected = "rule0" if path.startswith(("['backbone']", "['layer4")) else "rule1"
    assert label == expected, path
  assert labels["sam_rpe_3"]["rel_height"] == "rule1" and labels["layer4_spatial"]["block_0"]["bn3"]["scale"] \
      == "rule0"


def test_param_groups_name_unmatched_paths_and_unused_rules(cfg):
  groups = cfg.copy_and_resolve_references()
  groups.param_groups = (("backbone", 0.1), ("^head", 1.0))
  with pytest.raises(ValueError, match=r"leaves 3 parameter\(s\) unmatched: sam_rpe_3/gamma, "
                                       r"sam_rpe_3/query/conv/kernel, sam_rpe_3/rel_height"):
    optim.param_labels({k: v for k, v in _laga_like_params().items() if k != "cam_4"}, groups,
                       laga_net.BACKBONE_PATTERN)
  groups.param_groups = (("backbone", 0.1), ("^nothing_here/", 2.0), (".*", 1.0))
  with pytest.raises(ValueError, match=r"rule\(s\) \[\('\^nothing_here/', 2.0\)\] match no parameter"):
    optim.param_labels(_laga_like_params(), groups, laga_net.BACKBONE_PATTERN)


def test_frozen_group_gets_no_update(cfg):
  groups = cfg.copy_and_resolve_references()
  groups.param_groups = (("backbone", "frozen"), (".*", 1.0))
  params = {"backbone": {"w": jnp.ones((2,))}, "head": {"w": jnp.ones((2,))}}
  tx = optim.make_optimizer(groups, 1, backbone_pattern=laga_net.BACKBONE_PATTERN)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["backbone"]["w"], 0.0)
  assert np.all(np.asarray(updates["head"]["w"]) < 0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_other_optimizers_match_their_torch_formulas(cfg, name):
  """AdamW: p -= lr (adam + wd p); SGD (Nesterov): g += wd p, buf = m buf + g, p -= lr (g + m buf)."""
  c = cfg.copy_and_resolve_references()
  c.name, c.param_groups, c.nesterov = name, ((".*", 1.0),), True
  w = np.array([1.0, -2.0], np.float32)
  g = np.array([0.5, 0.25], np.float32)
  tx = optim.make_optimizer(c, 1)
  state = tx.init({"w": jnp.asarray(w)})
  updates, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state, {"w": jnp.asarray(w)})
  lr = optim.learning_rate(0, c)
  if name == "adamw":
    expected = -lr * (g / (np.abs(g) + c.eps) + c.weight_decay * w)
  else:
    gd = g + c.weight_decay * w
    expected = -lr * (gd + c.momentum * gd)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_warmup_cosine_schedule(cfg):
  c = cfg.copy_and_resolve_references()
  c.schedule, c.warmup_epochs, c.min_lr = "warmup_cosine", 2, 1e-6
  assert optim.learning_rate(0, c, num_epochs=10) == pytest.approx(c.warmup_start_lr)
  assert optim.learning_rate(2, c, num_epochs=10) == pytest.approx(c.lr)
  assert optim.learning_rate(6, c, num_epochs=10) == pytest.approx(c.min_lr + (c.lr - c.min_lr) / 2)
  assert optim.learning_rate(10, c, num_epochs=10) == pytest.approx(c.min_lr)


# --- the update ----------------------------------------------------------------------------------------------

def _numpy_adam_coupled_l2(params, grads_per_step, lrs, wd, b1, b2, eps):
  """torch.optim.Adam(weight_decay=wd) written out: g += wd p; bias-corrected moments; p -= lr m^/(sqrt(v^)+eps).

  Returns the update of every step.
  """
  p = np.asarray(params, np.float64)
  m, v, updates = np.zeros_like(p), np.zeros_like(p), []
  for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    p = p + updates[-1]
  return updates


def test_two_steps_equal_numpy_adam_with_coupled_l2(cfg):
  """Steps 0 and 1 with one step per epoch: LR of epoch 0 then epoch 1; backbone at 0.1x for equal inputs."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 4)).astype(np.float32)
  params = {"backbone": {"w": w}, "layer4_global": {"w": w}, "head": {"w": w}}
  grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
  tx = optim.make_optimizer(cfg, steps_per_epoch=1, backbone_pattern=laga_net.BACKBONE_PATTERN)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  current, all_updates = params, []  # compare the updates: they are ~1e-5 of the parameters
  for g in grads:
    updates, state = step({k: {"w": g} for k in params}, state, current)
    current = jax.tree_util.tree_map(lambda p, u: p + u, current, updates)
    all_updates.append(updates)
  first = all_updates[0]
  lrs = [optim.learning_rate(e, cfg) for e in (0, 1)]
  assert lrs[0] == pytest.approx(8e-6) and lrs[1] == pytest.approx(8.72e-5)
  for key, mult in (("backbone", 0.1), ("layer4_global", 0.1), ("head", 1.0)):
    expected = _numpy_adam_coupled_l2(w, grads, [mult * lr for lr in lrs], cfg.weight_decay, cfg.b1, cfg.b2,
                                      cfg.eps)
    for t, (ours, ref) in enumerate(zip(all_updates, expected)):
      # optax forms 1 - b2^t in float32 (torch in float64): ~1e-5 relative on the second step.
      np.testing.assert_allclose(ours[key]["w"], ref, rtol=1e-4, err_msg=f"{key}, step {t}")
  # Same parameters and gradients in both groups: the backbone step is exactly a tenth of the new layers'.
  np.testing.assert_allclose(first["backbone"]["w"], 0.1 * np.asarray(first["head"]["w"]), rtol=1e-6)
  assert np.abs(first["head"]["w"]).min() > 0


def test_weight_decay_is_coupled_not_decoupled(cfg):
  """With a zero gradient, coupled L2 still moves every parameter by ~lr (Adam normalises wd*p)."""
  tx = optim.make_optimizer(cfg, steps_per_epoch=1, backbone_pattern=laga_net.BACKBONE_PATTERN)
  params = {"backbone": {"bn_scale": jnp.full((2,), 3.0)}, "head": {"bias": jnp.full((2,), -2.0)}}
  updates, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  lr = optim.learning_rate(0, cfg)
  # First Adam step on g = wd * p: update = -lr * sign(p) (up to eps); AdamW would give -lr * wd * p.
  np.testing.assert_allclose(updates["head"]["bias"], [lr, lr], rtol=1e-3)
  np.testing.assert_allclose(updates["backbone"]["bn_scale"], [-0.1 * lr, -0.1 * lr], rtol=1e-3)
