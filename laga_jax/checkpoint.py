"""Orbax checkpoints: the latest N, the best by validation accuracy, exact resume, model fingerprints.

Layout in the workdir: `checkpoints/<step>/` (latest `keep` kept) and `best/<step>/` (one kept). Each
checkpoint holds the train-state arrays (`state`) and a JSON item (`meta`): epoch, step, the validation
accuracy and the *fingerprint* of the model and dataset it belongs to. Orbax writes into a temporary folder
and renames it only once complete, and deletes old checkpoints only after the new one is final, so a crash
during a save leaves the last good checkpoint in place (an unfinished folder is ignored on restore).

A damaged checkpoint (a truncated or overwritten data file, a missing `state/` or `_METADATA`, a garbled
`meta/metadata`) is reported in one line naming its folder and why, left on disk, and the newest intact one is
used instead; before the next save it is renamed `<step>.damaged` (kept, never deleted) so that it neither
collides with the new checkpoint nor counts among the kept ones. A save that runs out of disk space removes
its unfinished folder and fails with one line. Nothing is created under the workdir before the first save.
"""

import contextlib
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Callable, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config fields outside the model that change the meaning of the saved arrays; the model's own are its
# module's FINGERPRINT_FIELDS. Everything else (epochs, logging, evaluation options, the dataset root) may
# change between runs without invalidating a checkpoint.
DATA_FINGERPRINT_FIELDS = ("name", "options", "image_size")


class CheckpointMismatchError(ValueError):
  """A checkpoint from another model or dataset than the one configured."""


class CheckpointDamagedError(ValueError):
  """No intact checkpoint to restore; the message names every damaged one and why (one line)."""


class DiskFullError(OSError):
  """A save ran out of disk space; its unfinished folder was removed."""


log = logging.getLogger("laga_jax")
_WARNED: set = set()  # damaged folders already reported in this process (several Checkpointers may meet them)


def _jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=list))


def fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The JSON-able description a checkpoint must match to be restored into this run."""
  from laga_jax import models
  model = models.get_model(config.model.name)
  out = {"num_classes": int(num_classes), "model.name": config.model.name}
  for field in model.FINGERPRINT_FIELDS:
    out[f"model.{field}"] = _jsonable(config.model[field])
  for field in DATA_FINGERPRINT_FIELDS:
    out[f"data.{field}"] = _jsonable(config.data[field])
  return out


def parameter_fingerprint(fp: dict) -> dict:
  """The fingerprint fields that change the model's parameters (the classifier's class count aside, which
  feature extraction does not use): the model's fields and the image size (SAM-RPE's relative tables)."""
  return {k: v for k, v in fp.items() if k.startswith("model.") or k == "data.image_size"}


def damage_of(step_dir: pathlib.Path) -> Optional[str]:
  """Why the checkpoint folder `step_dir` cannot be restored, judged from its files (None: looks intact).

  Array data that is truncated or overwritten shows only when read; `Checkpointer` catches that too.
  """
  meta = step_dir / "meta" / "metadata"
  if not meta.is_file():
    return "meta/metadata is missing"
  try:
    value = json.loads(meta.read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return "meta/metadata is not valid JSON"
  if not isinstance(value, dict):
    return "meta/metadata is not a JSON object"
  if not (step_dir / "state").is_dir():
    return "its state/ folder is missing"
  if not (step_dir / "state" / "_METADATA").is_file():
    return "state/_METADATA is missing"
  return None


def _read_error(error: BaseException, step_dir: pathlib.Path) -> str:
  """A few words on why reading `step_dir` failed: the status code and the file named by the error."""
  text = " ".join(str(error).split())
  code = text.split(":", 1)[0] if text[:1].isupper() and "_" in text.split(":", 1)[0] else type(error).__name__
  # Tensorstore names the file it failed on as `local file "<path>"` (folders end with "/").
  files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
  where = ""
  if files:
    try:
      where = f" in {pathlib.Path(files[0]).relative_to(step_dir)}"
    except ValueError:
      where = ""
  return f"its array data cannot be read ({code}{where})"


def _is_disk_full(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def _drop_closed_loop_noise() -> None:
  """After a failed save or restore, tensorstore completes its pending futures on orbax's already closed
  event loops, and Python prints each as an ignored 'RuntimeError: Event loop is closed' traceback (some
  thousands after a full disk). Drop exactly those; every other unraisable exception is still shown."""
  if os.environ.get("LAGA_DEBUG") or getattr(sys.unraisablehook, "_laga_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._laga_filter = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs a failed background save as several ERROR tracebacks; the raised error says it once.

  `LAGA_DEBUG=1` keeps them.
  """
  if os.environ.get("LAGA_DEBUG"):
    yield
    return
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def describe_mismatch(saved: dict, current: dict) -> str:
  lines = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      lines.append(f"  {key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}")
  return "\n".join(lines)


def _handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _local_target(manager, step: int) -> Any:
  """The saved state's shapes and dtypes, placed on this process's first device.

  Without a target orbax would restore each array with the sharding it was saved with, which names the
  devices of the job that wrote it: a checkpoint of a multi-process (or multi-device) run could then not be
  read by a single process (evaluation, export, search).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)["state"]
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


class Checkpointer:
  """Save / restore a train-state pytree with its metadata under `workdir`."""

  def __init__(self, workdir: str, fingerprint: dict, *, keep: int = 2):
    self.root = pathlib.Path(workdir).absolute()
    self.fingerprint = fingerprint
    # create=False: the folders appear with the first save, so that searching or evaluating a workdir
    # without checkpoints leaves no empty checkpoints/ and best/ behind.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
    self._latest = ocp.CheckpointManager(self.root / "checkpoints", options=options, item_handlers=_handlers())
    best_options = ocp.CheckpointManagerOptions(max_to_keep=1, create=False)
    self._best = ocp.CheckpointManager(self.root / "best", options=best_options, item_handlers=_handlers())
    self._damaged: dict = {}   # step folder -> why it cannot be restored (found by a restore)
    self._restored: dict = {}  # manager directory -> the step a restore or read_meta used

  def _manager(self, best: bool):
    return self._best if best else self._latest

  def _steps(self, manager) -> list:
    """The manager's steps, newest first, without the ones found damaged."""
    return [s for s in sorted(manager.all_steps(), reverse=True)
            if manager.directory / str(s) not in self._damaged]

  def latest_step(self) -> Optional[int]:
    steps = self._steps(self._latest)
    return steps[0] if steps else None

  def best_step(self) -> Optional[int]:
    steps = self._steps(self._best)
    return steps[0] if steps else None

  def _newest_intact(self, manager, step: Optional[int], load: Callable[[int], Any]) -> Tuple[Optional[int], Any]:
    """(step, load(step)) of the newest intact checkpoint (or of `step`); (None, None) if there is none.

    A damaged one is remembered and reported in one line once a good one is found; if none is intact,
    `CheckpointDamagedError` names them all. A fingerprint mismatch is not damage: it propagates.
    """
    candidates = [int(step)] if step is not None else sorted(manager.all_steps(), reverse=True)
    damaged = []
    for candidate in candidates:
      folder = manager.directory / str(candidate)
      reason = self._damaged.get(folder) or damage_of(folder)
      if reason is None:
        try:
          with _quiet_orbax():
            result = load(candidate)
        except CheckpointMismatchError:
          raise
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many types for bad data
          _drop_closed_loop_noise()
          reason = _read_error(error, folder)
        else:
          self._restored[manager.directory] = candidate
          for bad, why in damaged:
            if (bad, why) not in _WARNED:
              _WARNED.add((bad, why))
              log.warning("checkpoint %s is damaged (%s): left in place, continuing from %s", bad, why, folder)
          return candidate, result
      self._damaged[folder] = reason
      damaged.append((folder, reason))
    if damaged:
      listed = "; ".join(f"{folder} ({why})" for folder, why in damaged)
      raise CheckpointDamagedError(f"no intact checkpoint under {manager.directory}: {listed}. They were left "
                                   "in place; move them away (or use a new --workdir) to start afresh")
    return None, None

  def _set_aside_damaged(self, manager) -> None:
    """Rename this manager's damaged step folders to `<step>.damaged` (kept), so that orbax neither keeps
    them instead of intact checkpoints nor refuses a new save of the same step."""
    moved = False
    for folder in [f for f in self._damaged if f.parent == manager.directory and f.exists()]:
      if jax.process_index() == 0:  # in a multi-process job every process found it; one renames it
        target = folder.with_name(folder.name + ".damaged")
        n = 1
        while target.exists():
          n += 1
          target = folder.with_name(f"{folder.name}.damaged{n}")
        folder.rename(target)
        log.warning("renamed damaged checkpoint %s to %s (kept, not deleted)", folder, target.name)
      del self._damaged[folder]
      moved = True
    if moved:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("laga_jax: damaged checkpoints set aside")
      manager.reload()

  def save(self, step: int, tree: Any, meta: dict, *, best: bool = False) -> None:
    """Write checkpoint `step` (and, when `best`, the best-checkpoint copy). Blocks until final."""
    meta = dict(meta, fingerprint=self.fingerprint, step=int(step))
    managers = [self._latest] + ([self._best] if best else [])
    for manager in managers:
      self._set_aside_damaged(manager)
    try:
      with _quiet_orbax():
        for manager in managers:
          manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        for manager in managers:
          manager.wait_until_finished()
    except Exception as error:
      _drop_closed_loop_noise()
      for manager in managers:  # our own unfinished folders; orbax would ignore them, but they fill the disk
        for partial in manager.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
          shutil.rmtree(partial, ignore_errors=True)
      if not _is_disk_full(error):
        raise
      try:
        free = f"{shutil.disk_usage(self.root).free / 2 ** 20:.0f} MiB free"
      except OSError:
        free = "free space unknown"
      last = self.latest_step()
      last = f"{self._latest.directory / str(last)}" if last is not None else "none"
      raise DiskFullError(errno.ENOSPC, f"no space left on device while saving checkpoint {int(step)} under "
                          f"{self.root} ({free}); its unfinished folder was removed; last complete checkpoint: "
                          f"{last}. Free some space and rerun the same command to resume") from None

  def read_meta(self, step: Optional[int] = None, *, best: bool = False) -> Optional[dict]:
    """The metadata of `step`, else of the checkpoint last restored, else of the newest intact one."""
    manager = self._manager(best)
    if step is None:
      step = self._restored.get(manager.directory)
    _, meta = self._newest_intact(manager, step, lambda s: self._read_meta(manager, s))
    return meta

  @staticmethod
  def _read_meta(manager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _check_fingerprint(self, manager, step: int, meta: dict, compare=lambda fp: fp) -> None:
    saved = meta.get("fingerprint", {})
    if compare(saved) != compare(self.fingerprint):
      raise CheckpointMismatchError(
          f"checkpoint {manager.directory / str(step)} was written for another model or dataset:\n"
          f"{describe_mismatch(compare(saved), compare(self.fingerprint))}\n"
          "Use a new --workdir for this config, or restore the config the checkpoint was trained with.")

  def restore(self, target: Any, step: Optional[int] = None, *,
              best: bool = False) -> Tuple[Optional[Any], Optional[dict]]:
    """Restore into the structure (and shardings) of `target`; (None, None) if there is no checkpoint.

    Raises `CheckpointMismatchError` naming every differing field when the checkpoint belongs to another
    model or dataset, before any array is read. Without `step`, a damaged newest checkpoint falls back to
    the newest intact one (`CheckpointDamagedError` when none is).
    """
    manager = self._manager(best)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)

    def load(s: int):
      meta = self._read_meta(manager, s)
      self._check_fingerprint(manager, s, meta)
      restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      return restored["state"], meta

    _, result = self._newest_intact(manager, step, load)
    return result if result is not None else (None, None)

  def restore_params(self, step: Optional[int] = None, *, best: bool = False,
                     parameters_only: bool = False) -> Tuple[dict, dict]:
    """({"params", "batch_stats"}, meta) of a checkpoint, fingerprint-checked; no optimiser state needed.

    For evaluation, search and export: the model alone is rebuilt from the config, never the optimiser.
    `parameters_only` compares only the fields that shape the model's parameters (`parameter_fingerprint`),
    so that a model can be evaluated on another dataset than the one it was trained on.
    """
    manager = self._manager(best)
    compare = parameter_fingerprint if parameters_only else (lambda fp: fp)

    def load(s: int):
      meta = self._read_meta(manager, s)
      self._check_fingerprint(manager, s, meta, compare)
      state = ocp.args.StandardRestore(_local_target(manager, s))
      return manager.restore(s, args=ocp.args.Composite(state=state))["state"], meta

    found, result = self._newest_intact(manager, step, load)
    if found is None:
      raise FileNotFoundError(f"no checkpoint under {manager.directory}")
    tree, meta = result
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, meta

  def restore_raw(self, step: int, *, best: bool = False) -> Any:
    """The saved train-state tree of `step` as stored (no target, no fingerprint check): to initialise
    another model from it (`config.model.init_from`)."""
    manager = self._manager(best)
    _, tree = self._newest_intact(manager, step, lambda s: manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(_local_target(manager, s))))["state"])
    return tree

  def close(self) -> None:
    self._latest.close()
    self._best.close()
