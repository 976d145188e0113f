"""Checks on a loaded config, so that a bad value fails at start-up with the field name and what to write."""

import pathlib
from typing import Any, Iterable

import ml_collections

MODES = ("train", "eval", "train_eval", "search")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field (as on the command line)."""


def _fail(field: str, value: Any, expected: str) -> None:
  raise ConfigError(f"--config.{field}={value!r}: expected {expected}")


def _one_of(config, field: str, choices: Iterable[Any]) -> None:
  value = _get(config, field)
  choices = tuple(choices)
  if value not in choices:
    _fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def _get(config, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _positive(config, field: str, *, allow=()) -> None:
  value = _get(config, field)
  if value in allow:
    return
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    extra = f" (or {', '.join(map(repr, allow))})" if allow else ""
    _fail(field, value, "a positive number" + extra)


def _pair(config, field: str) -> None:
  value = _get(config, field)
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(v, int) and v > 0 for v in value)):
    _fail(field, value, "(height, width), two positive integers")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` for the first field whose value cannot work."""
  from data_pipelines import datasets  # Deferred: keeps `import laga_jax` free of TensorFlow.

  _one_of(config, "mode", MODES)
  m = config.model
  if not m.stage_sizes:
    _one_of(config, "model.depth", (50, 101, 152))
  elif not all(isinstance(s, int) and s > 0 for s in m.stage_sizes) or len(m.stage_sizes) != 4:
    _fail("model.stage_sizes", m.stage_sizes, "four positive block counts, e.g. (3, 4, 6, 3), or ()")
  _positive(config, "model.width")
  _one_of(config, "model.last_stride", (1, 2))
  _positive(config, "model.num_stripes")
  _positive(config, "model.reduction_dim")
  if not 0.0 <= m.dropout < 1.0:
    _fail("model.dropout", m.dropout, "a probability in [0, 1)")
  _one_of(config, "model.cam_energy", ("author", "paper"))
  _one_of(config, "model.rpe", ("diagonal", "axial", "none"))
  _one_of(config, "model.dtype", ("float32", "bfloat16"))
  if m.pretrained and not pathlib.Path(m.pretrained).expanduser().is_file():
    _fail("model.pretrained", m.pretrained,
          "a torchvision ResNet50 weight file (.pth, .safetensors or .npz) that exists, or '' for random init")

  _one_of(config, "data.name", sorted(datasets.DATASETS))
  _one_of(config, "data.kind", ("body", "hand"))
  _pair(config, "data.image_size")
  _pair(config, "data.resize_size")
  h, w = config.data.image_size
  rh, rw = config.data.resize_size
  if rh < h or rw < w:
    _fail("data.resize_size", config.data.resize_size, f"at least data.image_size {tuple(config.data.image_size)}")
  if not 0.0 <= config.data.erasing_p <= 1.0:
    _fail("data.erasing_p", config.data.erasing_p, "a probability in [0, 1]")
  _positive(config, "data.p")
  _positive(config, "data.k")
  if config.loss.triplet_beta > 0 and (config.data.p < 2 or config.data.k < 2):
    _fail("data.p" if config.data.p < 2 else "data.k", min(config.data.p, config.data.k),
          "at least 2 (batch-hard triplet needs positives and negatives in every batch; "
          "or set --config.loss.triplet_beta=0)")

  if not 0.0 <= config.loss.label_smoothing < 1.0:
    _fail("loss.label_smoothing", config.loss.label_smoothing, "a value in [0, 1)")
  if config.loss.triplet_beta < 0:
    _fail("loss.triplet_beta", config.loss.triplet_beta, "a non-negative weight")
  _one_of(config, "loss.triplet_feature", ("embedding", "pooled"))

  _positive(config, "optim.lr")
  _positive(config, "optim.backbone_lr_mult")
  if config.optim.weight_decay < 0:
    _fail("optim.weight_decay", config.optim.weight_decay, "a non-negative coefficient")

  _positive(config, "train.num_epochs")
  _positive(config, "train.steps_per_epoch", allow=(-1,))
  _positive(config, "train.max_steps", allow=(-1,))
  _positive(config, "train.num_devices", allow=(-1,))
  _one_of(config, "train.parallel", ("shard_map", "pmap"))
  _positive(config, "train.keep_checkpoints")
  _positive(config, "train.log_every_steps")
  _positive(config, "eval.batch_size")
  _positive(config, "eval.max_rank")
  _positive(config, "eval.query_chunk")
  _positive(config, "eval.num_draws")
