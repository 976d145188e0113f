"""Orbax checkpoints: the latest N, the best by validation accuracy, exact resume, model fingerprints.

Layout in the workdir: `checkpoints/<step>/` (latest `keep` kept) and `best/<step>/` (one kept). Each
checkpoint holds the train-state arrays (`state`) and a JSON item (`meta`): epoch, step, the validation
accuracy and the *fingerprint* of the model and dataset it belongs to. Orbax writes into a temporary folder
and renames it only once complete, and deletes old checkpoints only after the new one is final, so a crash
during a save leaves the last good checkpoint in place (an unfinished folder is ignored on restore).
"""

import json
import pathlib
from typing import Any, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp

# Config fields that change the meaning or the shapes of the saved arrays; everything else (epochs, logging,
# evaluation options, the dataset root) may change between runs without invalidating a checkpoint.
FINGERPRINT_FIELDS = {
    "model": ("depth", "stage_sizes", "width", "last_stride", "use_local", "num_stripes", "use_cam",
              "use_sam_rpe", "shared_layer4", "reduction_dim", "cam_energy", "rpe"),
    "data": ("name", "options", "image_size"),
}


class CheckpointMismatchError(ValueError):
  """A checkpoint from another model or dataset than the one configured."""


def fingerprint(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """The JSON-able description a checkpoint must match to be restored into this run."""
  out = {"num_classes": int(num_classes)}
  for section, fields in FINGERPRINT_FIELDS.items():
    for field in fields:
      value = config[section][field]
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      out[f"{section}.{field}"] = json.loads(json.dumps(value, default=list))
  return out


def describe_mismatch(saved: dict, current: dict) -> str:
  lines = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      lines.append(f"  {key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}")
  return "\n".join(lines)


class Checkpointer:
  """Save / restore a train-state pytree with its metadata under `workdir`."""

  def __init__(self, workdir: str, fingerprint: dict, *, keep: int = 2):
    self.root = pathlib.Path(workdir).absolute()
    self.fingerprint = fingerprint
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._latest = ocp.CheckpointManager(self.root / "checkpoints", options=options,
                                         item_names=("state", "meta"))
    best_options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self._best = ocp.CheckpointManager(self.root / "best", options=best_options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._latest.latest_step()

  def best_step(self) -> Optional[int]:
    return self._best.latest_step()

  def save(self, step: int, tree: Any, meta: dict, *, best: bool = False) -> None:
    """Write checkpoint `step` (and, when `best`, the best-checkpoint copy). Blocks until final."""
    meta = dict(meta, fingerprint=self.fingerprint, step=int(step))
    managers = [self._latest] + ([self._best] if best else [])
    for manager in managers:
      manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    for manager in managers:
      manager.wait_until_finished()

  def read_meta(self, step: Optional[int] = None, *, best: bool = False) -> Optional[dict]:
    manager = self._best if best else self._latest
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, target: Any, step: Optional[int] = None, *,
              best: bool = False) -> Tuple[Optional[Any], Optional[dict]]:
    """Restore into the structure (and shardings) of `target`; (None, None) if there is no checkpoint.

    Raises `CheckpointMismatchError` naming every differing field when the checkpoint belongs to another
    model or dataset, before any array is read.
    """
    manager = self._best if best else self._latest
    step = manager.latest_step() if step is None else step
    if step is None:
      return None, None
    meta = self.read_meta(step, best=best)
    saved = meta.get("fingerprint", {})
    if saved != self.fingerprint:
      raise CheckpointMismatchError(
          f"checkpoint {manager.directory / str(step)} was written for another model or dataset:\n"
          f"{describe_mismatch(saved, self.fingerprint)}\n"
          "Use a new --workdir for this config, or restore the config the checkpoint was trained with.")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"], meta

  def close(self) -> None:
    self._latest.close()
    self._best.close()
