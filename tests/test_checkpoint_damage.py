"""A damaged newest checkpoint falls back to the newest intact one, in one line, deleting nothing; a full
disk fails in one line and leaves no unfinished folder."""

import errno
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from laga_jax import checkpoint as checkpoint_lib

FINGERPRINT = {"num_classes": 4, "model.name": "test"}


def _tree(value: float) -> dict:
  return {"step": jnp.asarray(int(value)), "params": {"w": jnp.full((64, 48), value), "b": {"c": jnp.ones(3)}},
          "batch_stats": {"mean": jnp.full((3,), value)},
          "opt_state": (jnp.zeros(2), {"mu": jnp.full((4, 4), value)}), "rng": jax.random.PRNGKey(0)}


def _data_files(step_dir):
  return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(step_dir):
  for f in _data_files(step_dir):
    f.write_bytes(f.read_bytes()[:10])


def _overwrite(step_dir):
  for f in _data_files(step_dir):
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


DAMAGES = {
    "truncated data file": (_truncate, "its array data cannot be read (OUT_OF_RANGE in state/"),
    "overwritten data file": (_overwrite, "its array data cannot be read"),
    "missing state/": (lambda d: shutil.rmtree(d / "state"), "its state/ folder is missing"),
    "garbage meta/metadata": (lambda d: (d / "meta" / "metadata").write_bytes(b"\x00\x17garbage"),
                              "meta/metadata is not valid JSON"),
    "missing _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "state/_METADATA is missing"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A workdir with intact checkpoints 18 and 54 (and a best copy of 54), written once."""
  root = tmp_path_factory.mktemp("pristine")
  ckpt = checkpoint_lib.Checkpointer(str(root), FINGERPRINT, keep=2)
  ckpt.save(18, _tree(18), {"epoch": 1})
  ckpt.save(54, _tree(54), {"epoch": 3}, best=True)
  ckpt.close()
  return root


@pytest.fixture(autouse=True)
def _fresh_warnings():
  checkpoint_lib._WARNED.clear()


def _copy(pristine, tmp_path):
  shutil.copytree(pristine, tmp_path / "w")
  return tmp_path / "w"


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_falls_back_in_one_line(pristine, tmp_path, caplog, damage):
  workdir = _copy(pristine, tmp_path)
  apply, reason = DAMAGES[damage]
  apply(workdir / "checkpoints" / "54")
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  ckpt = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  with caplog.at_level(logging.WARNING, logger="laga_jax"):
    tree, meta = ckpt.restore(_tree(0))
  assert int(tree["step"]) == 18 and meta["epoch"] == 1
  np.testing.assert_array_equal(tree["params"]["w"], np.full((64, 48), 18.0))
  warnings = [r.getMessage() for r in caplog.records if r.name == "laga_jax"]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert str(workdir / "checkpoints" / "54") in warnings[0] and reason in warnings[0], warnings[0]
  assert str(workdir / "checkpoints" / "18") in warnings[0]
  # The metadata of the checkpoint in use, and the step a resumed run continues from.
  assert ckpt.read_meta()["epoch"] == 1 and ckpt.latest_step() == 18
  # Parameters only (evaluation, search) fall back the same way.
  params, _ = ckpt.restore_params()
  np.testing.assert_array_equal(params["params"]["w"], np.full((64, 48), 18.0))
  ckpt.close()
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before  # nothing deleted or added


def test_next_save_sets_the_damaged_folder_aside_and_keeps_it(pristine, tmp_path):
  """Resuming from 18 past a damaged 54: new saves neither collide with 54 nor make orbax drop 18 for it."""
  workdir = _copy(pristine, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "54" / "state")
  ckpt = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  tree, _ = ckpt.restore(_tree(0))
  assert int(tree["step"]) == 18
  for step in (19, 54):
    ckpt.save(step, _tree(step), {"epoch": 2})
  ckpt.close()
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert names == ["19", "54", "54.damaged"], names
  assert (workdir / "checkpoints" / "54.damaged" / "meta" / "metadata").is_file()
  again = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  tree, _ = again.restore(_tree(0))
  assert int(tree["step"]) == 54
  again.close()


def test_no_intact_checkpoint_is_one_error_naming_them(pristine, tmp_path):
  workdir = _copy(pristine, tmp_path)
  (workdir / "checkpoints" / "54" / "state" / "_METADATA").unlink()
  (workdir / "checkpoints" / "18" / "meta" / "metadata").write_text("{not json")
  ckpt = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  with pytest.raises(checkpoint_lib.CheckpointDamagedError) as info:
    ckpt.restore(_tree(0))
  message = str(info.value)
  assert "\n" not in message
  assert f"{workdir / 'checkpoints' / '54'} (state/_METADATA is missing)" in message
  assert f"{workdir / 'checkpoints' / '18'} (meta/metadata is not valid JSON)" in message
  ckpt.close()
  assert (workdir / "checkpoints" / "54").is_dir() and (workdir / "checkpoints" / "18").is_dir()


def test_damaged_best_is_named(pristine, tmp_path):
  workdir = _copy(pristine, tmp_path)
  _truncate(workdir / "best" / "54")
  ckpt = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  with pytest.raises(checkpoint_lib.CheckpointDamagedError, match=r"best/54 \(its array data cannot be read"):
    ckpt.restore_params(best=True)
  ckpt.close()


def test_a_foreign_checkpoint_is_still_refused_not_skipped(pristine, tmp_path):
  workdir = _copy(pristine, tmp_path)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), dict(FINGERPRINT, num_classes=5), keep=2)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="num_classes: checkpoint has 4, config has 5"):
    ckpt.restore(_tree(0))
  ckpt.close()


def test_nothing_is_created_without_a_save(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), FINGERPRINT, keep=2)
  assert ckpt.latest_step() is None and ckpt.read_meta() is None and ckpt.restore(_tree(0)) == (None, None)
  ckpt.close()
  assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_and_removes_the_unfinished_folder(pristine, tmp_path, monkeypatch):
  """The error orbax raises when the disk fills (tensorstore's RESOURCE_EXHAUSTED, errno 28) mid-save."""
  workdir = _copy(pristine, tmp_path)
  ckpt = checkpoint_lib.Checkpointer(str(workdir), FINGERPRINT, keep=2)
  real_save = ckpt._latest.save

  def full_disk(step, *args, **kwargs):
    partial = ckpt._latest.directory / f"{step}.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "chunk").write_bytes(b"\0" * 100)
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "{partial}/": '
                     "Failed to write 1275109 bytes to file 7: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ckpt._latest, "save", full_disk)
  with pytest.raises(checkpoint_lib.DiskFullError) as info:
    ckpt.save(60, _tree(60), {"epoch": 4})
  message = str(info.value)
  assert info.value.errno == errno.ENOSPC and "\n" not in message
  assert "no space left on device while saving checkpoint 60" in message
  assert f"last complete checkpoint: {workdir / 'checkpoints' / '54'}" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["18", "54"]
  monkeypatch.setattr(ckpt._latest, "save", real_save)
  ckpt.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a small tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem(tmp_path, capfd):
  mnt = tmp_path / "small"
  mnt.mkdir()
  if os.system(f"mount -t tmpfs -o size=400k tmpfs {mnt} 2>/dev/null") != 0:
    pytest.skip("mount not permitted here")
  try:
    ckpt = checkpoint_lib.Checkpointer(str(mnt / "w"), FINGERPRINT, keep=2)
    ckpt.save(1, _tree(1), {"epoch": 0})
    big = dict(_tree(2), params={"w": jax.random.normal(jax.random.PRNGKey(1), (400, 400))})
    with pytest.raises(checkpoint_lib.DiskFullError, match="last complete checkpoint: .*checkpoints/1"):
      ckpt.save(2, big, {"epoch": 1})
    ckpt.close()
    assert sorted(p.name for p in (mnt / "w" / "checkpoints").iterdir()) == ["1"]
    assert "Traceback" not in capfd.readouterr().err
  finally:
    os.system(f"umount {mnt}")
