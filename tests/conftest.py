"""Test-session set-up shared by every test module.

Two host CPU devices are forced before JAX starts so that the data-parallel tests (pmap, shard_map) run
on a CPU-only machine; single-device code is unaffected.
"""

import os
import pathlib

# XLA's LLVM back-end at -O0 for every program the suite compiles in its own processes. The
# suite's programs are tiny, so compiling them is most of its time, and -O0 about halves that. The HLO
# passes, the libraries that run the dots and convolutions and the float semantics (no fast-math at any
# level) stay as they are, so every numerical check means what it says.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
# The run.py subprocesses (`run_py`, and the test files that start run.py) get RUN_PY_XLA_FLAGS: they
# evaluate hundreds of images, so unoptimised element-wise code costs them more than -O0 saves in compiling,
# while -O1 compiles faster than the default and runs about as fast. One-process demo jobs, idle, wall / CPU
# seconds: the shared trained run 53.4 / 70.3 at the default, 40.2 / 48.6 at -O1; the multi-process tests'
# reference 46.5 / 63.8 at the default, 39.2 / 49.7 at -O1, 51.1 / 73.5 at -O0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The `run.py` subprocesses of the suite (the demo, resume, eval, export and multi-process jobs) compile the
# same programs again and again: a compilation cache for this session lets the later ones load them. Under
# pytest-xdist the controller makes it before it starts the workers, which inherit it; only the controller,
# which outlives them, removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE = tempfile.mkdtemp(prefix="laga_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # The run.py processes cache every program, however quick to compile: each compiles ~120 small eager ones
  # (0.01-0.1 s each), the same in every job; loading them saved 4 of 27 CPU seconds of a warm demo job.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# In the suite's own processes only programs that took a second or more: most of their many small programs
# are compiled once per session.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

RUN_PY_XLA_FLAGS = "--xla_backend_optimization_level=1"

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REALDATA = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "realdata")


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session")
def realdata_dir() -> pathlib.Path:
  """`../shared/realdata` beside the checkout; tests that need it skip with a message when it is absent."""
  root = pathlib.Path(os.environ.get("LAGA_REALDATA", REALDATA))
  if not root.is_dir():
    pytest.skip(f"real dataset metadata not found at {root} (set LAGA_REALDATA to its path)")
  return root


# --- a tiny trained run, shared by the inference, export and index tests -----------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny LAGA-Net of the suite's run.py jobs on the demo data (this file's shared run and test_run.py's later
# jobs on it): 32×16, width 8, 6 steps (two epochs of 3: two checkpoint saves). One model, schedule and
# evaluation batch for all of them, so that each of their programs is compiled once per session (the
# compilation cache above).
TINY_LAGA = ("--config.data.image_size=(32,16)", "--config.data.resize_size=(36,18)", "--config.model.width=8",
             "--config.model.reduction_dim=16", "--config.train.num_epochs=2", "--config.train.steps_per_epoch=3",
             "--config.eval.batch_size=32")
# The shared trained run, as a user's demo run ends: the untrained model evaluated too, two figures.
TINY_RUN = (*TINY_LAGA, "--config.eval.num_figures=2")


def run_py_env(devices: int = 1, **extra: str) -> dict:
  """The environment of a `run.py` subprocess: the CPU, `devices` host devices, RUN_PY_XLA_FLAGS."""
  flags = RUN_PY_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


def run_py(*args, timeout: int = 900):
  """`python run.py *args` from the checkout on one CPU device; the CompletedProcess (text)."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=ROOT, env=run_py_env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """(workdir, data root, the run's CompletedProcess): the demo config trained briefly and evaluated by
  run.py, so the workdir has config.json, checkpoints and evaluation's features_final.npz. Tests that run
  more jobs in a workdir run them in a copy of it."""
  root = tmp_path_factory.mktemp("trained")
  done = run_py("--config", "configs/demo.py", "--workdir", root / "run", f"--config.data.root={root / 'data'}",
                *TINY_RUN)
  assert done.returncode == 0, done.stderr[-3000:]
  return root / "run", root / "data", done


@pytest.fixture(scope="session")
def trained_extractor(trained_run):
  """`FeatureExtractor.from_workdir` of the trained run (compiled once per session)."""
  from laga_jax.inference import FeatureExtractor
  return FeatureExtractor.from_workdir(trained_run[0])


# --- scheduling on two workers (pytest-xdist; pytest.ini sets `-n 2 --no-loadscope-reorder`) ---------------

# Files that share the session's tiny trained run: one worker builds it once for all of them.
_TRAINED_RUN_FILES = ("test_run.py", "test_export.py", "test_index.py", "test_inference.py")
# The longest work units (run.py subprocesses, multi-process jobs), started first so the workers end together.
_LONGEST_FIRST = ("test_distributed.py", "trained_run", "test_hand_protocol_run.py", "test_models.py",
                  "test_train.py")


def _unit(nodeid: str) -> str:
  """A test's work unit: its file (whose module fixtures are then built once), or "trained_run"."""
  name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
  return "trained_run" if name in _TRAINED_RUN_FILES else name


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """xdist's per-scope scheduler with `_unit` as the scope. (`--dist loadgroup` would do it with marks, but
  xdist 3.8 cannot rename the tests of pytest >= 9.2, so its groups are ignored there.)"""
  from xdist.scheduler import LoadScopeScheduling

  class UnitScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _unit(nodeid)

  return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
  """The longest units first; `--no-loadscope-reorder` keeps this order when the units are handed out."""
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))   # stable: order within a unit kept
