"""Whole-training parity: the JAX train step against PyTorch LAGA-Net and BoT runs, trained step by step.

`laga_trajectory.npz` is a run of `benchmarks/torch_reference` (torchvision ResNet, the author's CAM / SAM-RPE /
ClassBlock, LS-CE + batch-hard triplet summed over six heads, torch.optim.Adam with weight_decay and the
backbone group at 0.1x, the per-epoch warm-up and step schedule): 24 steps of a tiny LAGA-Net (width 16, one
block per stage, 128x64, P x K = 4 x 2, dropout 0) crossing the end of the warm-up and two decay epochs.
`bot_trajectory.npz` is 24 steps of a tiny BoT trained as reid-strong-baseline trains it (BNNeck, LS-CE +
triplet + center loss with the centers' own SGD, per-parameter Adam, WarmupMultiStepLR stepped per epoch),
likewise crossing the warm-up's end and both decays. Here the project's own training path (model registry,
configs/bot.py's recipe for BoT, optimiser, `train_step`, eval features) replays the same batches from the
same initial weights, which are regenerated from `reference_weights.py` and mapped through the project's
weight ports. Regenerate the fixtures, and compare live, with
`python -m benchmarks.torch_reference.parity --write-fixture` in an environment with torch
(benchmarks/torch_reference/README.md).
"""

import jax
import numpy as np
import pytest

from benchmarks.torch_reference import jax_side
from benchmarks.torch_reference import spec as spec_lib


@pytest.fixture(scope="module", params=sorted(spec_lib.FIXTURES))
def fixture(request):
  spec, torch_run, meta = spec_lib.read_fixture(spec_lib.FIXTURES[request.param])
  initial = spec_lib.fixture_initial_state_dict(spec, meta)
  spec_lib.check_regenerated(spec, meta, initial)
  return spec, torch_run, initial


# XLA's backend (LLVM) optimisation off: the train step compiles in about half the time. The HLO, i.e. the
# computation, is the one training runs; only rounding differs, well inside the tolerances.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def report(fixture):
  spec, torch_run, initial = fixture
  with jax.default_matmul_precision("highest"):
    jax_run = jax_side.run(spec, initial, compiler_options=FAST_COMPILE)
  return spec_lib.compare(jax_run, torch_run)


def test_fixture_crosses_the_schedule_boundaries(fixture):
  """The stored run sees the warm-up, its end and both decay epochs (the new layers' LR per step)."""
  spec, torch_run, _ = fixture
  if isinstance(spec, spec_lib.BoTSpec):  # WarmupMultiStepLR at scheduler epoch e + 1
    rate, warmup_epochs, decays = spec_lib.bot_learning_rate, spec.warmup_iters - 1, [m - 1 for m in spec.milestones]
  else:
    rate, warmup_epochs, decays = spec_lib.learning_rate, spec.warmup_epochs, spec.decay_epochs
  expected = [rate(step // spec.steps_per_epoch, spec) for step in range(spec.steps)]
  np.testing.assert_allclose(torch_run["lr"], expected, rtol=1e-12)
  assert len(set(np.round(torch_run["lr"], 12))) == warmup_epochs + 1 + len(decays)
  assert spec.steps > spec.steps_per_epoch * max(decays)


def test_per_step_losses(report):
  errors = np.asarray(report["loss"])
  assert errors.max() <= spec_lib.LOSS_RTOL, f"step {errors.argmax()}: loss relative error {errors.max():.2e}"


@pytest.mark.parametrize("collection, tol", [("params", spec_lib.PARAM_RTOL),
                                             ("batch_stats", spec_lib.STATS_RTOL)])
def test_final_variables(report, collection, tol):
  name, error = spec_lib.worst(report[collection])
  assert len(report[collection]) >= 30  # every tensor of the fixture (compare checks the names match)
  assert error <= tol, f"{name}: final relative error {error:.2e}"


def test_parameter_updates(report):
  """final - initial of every parameter (sketched for the large ones), stricter than the final values."""
  name, error = spec_lib.worst(report["params_update"])
  assert error <= spec_lib.UPDATE_RTOL, f"{name}: update relative error {error:.2e}"


def test_final_eval_features(report):
  assert report["features"] <= spec_lib.FEATURE_RTOL, f"features: relative error {report['features']:.2e}"
