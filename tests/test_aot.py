"""Ahead-of-time compilation for accelerators this machine lacks (benchmarks/aot.py): a tiny LAGA-Net step.

Compiles the trainer's train step (jit + shard_map, as the trainer runs it) for one GPU target (H100) and
one TPU topology (v5e), on one device and data-parallel over eight, plus the eval feature step; checks that
each compiles and fits, and that the memory XLA reports grows with the per-device batch. About seven small
compiles, 2-3 minutes on two cores; the full-size matrix (pmap too, every target) is `python -m
benchmarks.aot`. Needs the `aot` extras (libtpu and the CUDA PJRT plugin matching jax, see
README "Accelerators"); skipped with a message without them.
"""

import pytest

from benchmarks import aot

STATUS = aot.extras_status()
NUM_CLASSES = 8
IMAGE = (64, 32)


def needs(platform: str):
  return pytest.mark.skipif(STATUS[platform] is not None, reason=f"aot extras missing: {STATUS[platform]}")


def tiny_config():
  config = aot.load_config("configs/demo.py", [f"data.image_size={IMAGE}", "data.p=2", "data.k=2",
                                               "model.reduction_dim=32"])
  assert tuple(config.model.stage_sizes) == (1, 1, 1, 1) and config.model.width == 16
  return config


@pytest.fixture(scope="module")
def program():
  return aot.build_program(tiny_config(), NUM_CLASSES, steps_per_epoch=10)


def compile_train(program, target, layout, batch, mode="shard_map"):
  # GPU kernels without GEMM autotuning: the same HLO passes and buffer assignment, a third quicker here.
  record = aot.compile_step(aot.TARGETS[target], layout, "train", program, IMAGE, batch, mode,
                            fast_gpu_codegen=True)
  assert record.get("error") is None, record
  assert record["fits"] and record["memory"]["argument"] > 0 and record["memory"]["temp"] > 0, record
  assert record["flops"] and record["roofline_images_per_s_bound"] > 0, record
  return record


@needs("cuda")
def test_gpu_train_step_compiles_single_and_data_parallel(program):
  single = compile_train(program, "h100", "single", 8)
  # The donated state comes back in place: outputs alias the state's buffers.
  assert single["memory"]["alias"] > 0.9 * single["memory"]["output"]
  dp = compile_train(program, "h100", "dp", 16)
  assert (dp["devices"], dp["per_device_batch"], dp["topology"]) == (8, 2, "1x1x8")
  # A quarter of the single device's images per device: fewer temporaries, and about a quarter of the FLOPs
  # (the replicated optimiser update and the gradient all-reduce add a little).
  assert dp["memory"]["temp"] < single["memory"]["temp"]
  assert 0.2 < dp["flops"] / single["flops"] < 0.5


@needs("tpu")
def test_tpu_train_and_eval_steps_compile_single_and_data_parallel(program):
  small, large = (compile_train(program, "v5e", "single", b) for b in (4, 8))
  assert large["memory"]["temp"] > small["memory"]["temp"]
  assert large["memory"]["peak"] > small["memory"]["peak"]
  assert small["flops_source"] == "compiled" and large["flops"] > small["flops"]
  dp = compile_train(program, "v5e", "dp", 16)
  assert (dp["devices"], dp["per_device_batch"], dp["topology"]) == (8, 2, "v5e:2x4")
  evaluated = aot.compile_step(aot.TARGETS["v5e"], "dp", "eval", program, IMAGE, 16)
  assert evaluated.get("error") is None and evaluated["fits"], evaluated


def test_batch_search_brackets_the_memory_limit():
  """Linear guess, then bisection, on a fake step whose peak is 100 + 10 * batch bytes."""
  calls = []

  def probe(batch):
    calls.append(batch)
    peak = 100 + 10 * batch
    return {"batch": batch, "fits": peak <= 1000, "compile_s": 0.0,
            "memory": {"peak": peak, "temp": 10 * batch}}

  found = aot.search_max_batch(probe, probe(8), unit=4, limit=1000, steps=6)
  assert (found["max_batch"], found["first_failing"], found["exact"]) == (88, 92, True)
  assert len(calls) <= 4
  # A failure with no memory number (a TPU out-of-memory compile) is bisected.
  fails = lambda batch: {"batch": batch, "fits": batch <= 40, "compile_s": 0.0}
  found = aot.search_max_batch(fails, {"batch": 64, "fits": False, "compile_s": 0.0}, unit=8, limit=1, steps=5)
  assert found["max_batch"] == 40 and found["exact"]


def test_targets_and_aliases():
  assert [t.name for t in aot.expand_targets("h100,a100,v5e,v4")] == ["h100", "a100-40", "a100-80", "v5e", "v4"]
  for target in aot.TARGETS.values():
    assert target.memory_bytes > 0 and target.peak_tflops["bfloat16"] > 0
    if target.platform == "cuda":
      assert "device_memory_size" in target.spec_text()
