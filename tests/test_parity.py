"""Whole-training parity: the JAX train step against a PyTorch LAGA-Net trained step by step.

The fixture `laga_trajectory.npz` is a run of `benchmarks/torch_reference` (torchvision ResNet, the author's
CAM / SAM-RPE / ClassBlock, LS-CE + batch-hard triplet summed over six heads, torch.optim.Adam with
weight_decay and the backbone group at 0.1x, the per-epoch warm-up and step schedule): 24 steps of a tiny
LAGA-Net (width 16, one block per stage, 128x64, P x K = 4 x 2, dropout 0) crossing the end of the warm-up
and two decay epochs. Here the project's own training path (model registry, optimiser, `train_step`,
flip-averaged features) replays the same batches from the same initial weights, which are regenerated from
`reference_weights.py` and mapped through the project's torchvision port. Regenerate the fixture, and
compare live, with `python -m benchmarks.torch_reference.parity --write-fixture` in an environment with torch
(benchmarks/torch_reference/README.md).
"""

import jax
import numpy as np
import pytest

from benchmarks.torch_reference import jax_side
from benchmarks.torch_reference import spec as spec_lib


@pytest.fixture(scope="module")
def fixture():
  spec, torch_run, meta = spec_lib.read_fixture()
  initial = spec_lib.initial_state_dict(spec_lib.state_dict_shapes(meta), spec.seed)
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
  expected = [spec_lib.learning_rate(step // spec.steps_per_epoch, spec) for step in range(spec.steps)]
  np.testing.assert_allclose(torch_run["lr"], expected, rtol=1e-12)
  assert len(set(np.round(torch_run["lr"], 12))) == spec.warmup_epochs + 1 + len(spec.decay_epochs)
  assert spec.steps > spec.steps_per_epoch * max(spec.decay_epochs)


def test_per_step_losses(report):
  errors = np.asarray(report["loss"])
  assert errors.max() <= spec_lib.LOSS_RTOL, f"step {errors.argmax()}: loss relative error {errors.max():.2e}"


@pytest.mark.parametrize("collection, tol", [("params", spec_lib.PARAM_RTOL),
                                             ("batch_stats", spec_lib.STATS_RTOL)])
def test_final_variables(report, collection, tol):
  name, error = spec_lib.worst(report[collection])
  assert len(report[collection]) >= 90
  assert error <= tol, f"{name}: final relative error {error:.2e}"


def test_parameter_updates(report):
  """final - initial of every parameter (sketched for the large ones), stricter than the final values."""
  name, error = spec_lib.worst(report["params_update"])
  assert error <= spec_lib.UPDATE_RTOL, f"{name}: update relative error {error:.2e}"


def test_final_eval_features(report):
  assert report["features"] <= spec_lib.FEATURE_RTOL, f"features: relative error {report['features']:.2e}"
