"""Test-session set-up shared by every test module.

Two host CPU devices are forced before JAX starts so that the data-parallel tests (pmap, shard_map) run
on a CPU-only machine; single-device code is unaffected.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

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
