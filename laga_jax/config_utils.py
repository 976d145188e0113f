"""Checks on a loaded config, so that a bad value fails at start-up with the field name and what to write."""

import pathlib
from typing import Any, Iterable

import ml_collections

MODES = ("train", "eval", "train_eval", "search", "maps")


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


def fail(field: str, value: Any, expected: str) -> None:
  """Raise `ConfigError` for `--config.<field>=<value>`, saying what was expected."""
  _fail(field, value, expected)


def check_model_common(model_cfg: ml_collections.ConfigDict) -> None:
  """Checks of the `config.model` fields every model has (`dtype`, `pretrained`, `init_from`) and of those
  several share (`leaky_slope`)."""
  if model_cfg.get("dtype", "float32") not in ("float32", "bfloat16"):
    _fail("model.dtype", model_cfg.dtype, "one of 'float32', 'bfloat16'")
  slope = model_cfg.get("leaky_slope", 0.0)
  if isinstance(slope, bool) or not isinstance(slope, (int, float)) or slope < 0:
    _fail("model.leaky_slope", slope, "a LeakyReLU slope >= 0 (LAGA-Net: 0.1)")
  pretrained = model_cfg.get("pretrained", "")
  if pretrained and not pathlib.Path(pretrained).expanduser().is_file():
    _fail("model.pretrained", pretrained,
          "a torchvision ResNet50 weight file (.pth, .safetensors or .npz) that exists, or '' for random init")
  init_from = model_cfg.get("init_from", "")
  if init_from and not (pathlib.Path(init_from).expanduser() / "checkpoints").is_dir():
    _fail("model.init_from", init_from, "a workdir with a checkpoints/ folder, or ''")


def _check_loss(config, model) -> None:
  from laga_jax import losses
  loss = config.loss
  if loss.get("head_reduction", "sum") not in losses.HEAD_REDUCTIONS:
    _fail("loss.head_reduction", loss.head_reduction, "one of " + ", ".join(map(repr, losses.HEAD_REDUCTIONS)))
  for name in losses.LOSS_NAMES:
    if name in loss and (isinstance(loss[name].weight, bool) or loss[name].weight < 0):
      _fail(f"loss.{name}.weight", loss[name].weight, "a non-negative weight (0 leaves the loss out)")
  if not 0.0 <= loss.ce.label_smoothing < 1.0:
    _fail("loss.ce.label_smoothing", loss.ce.label_smoothing, "a value in [0, 1)")
  metric_losses = [n for n in ("triplet", "center") if n in loss and loss[n].weight > 0]
  center_lr = loss.center.get("lr", 0.5) if "center" in loss else 0.5
  if isinstance(center_lr, bool) or not isinstance(center_lr, (int, float)) or center_lr <= 0:
    _fail("loss.center.lr", center_lr, "a positive learning rate for the centers")
  for name in metric_losses:
    if loss[name].feature not in model.FEATURE_TAPS:
      _fail(f"loss.{name}.feature", loss[name].feature,
            f"one of {', '.join(map(repr, model.FEATURE_TAPS))} (the feature taps of model {model.NAME!r})")
  if "triplet" in metric_losses:
    if not loss.triplet.soft and loss.triplet.margin <= 0:
      _fail("loss.triplet.margin", loss.triplet.margin, "a positive margin (or --config.loss.triplet.soft=True)")
    if config.data.p < 2 or config.data.k < 2:
      _fail("data.p" if config.data.p < 2 else "data.k", min(config.data.p, config.data.k),
            "at least 2 (batch-hard triplet needs positives and negatives in every batch; "
            "or set --config.loss.triplet.weight=0)")
  if not any(loss[n].weight > 0 for n in losses.LOSS_NAMES if n in loss):
    _fail("loss.ce.weight", loss.ce.weight, "a positive weight for at least one loss")


def _check_optim(config) -> None:
  from laga_jax import optim
  o = config.optim
  _one_of(config, "optim.name", optim.OPTIMIZERS)
  _one_of(config, "optim.schedule", optim.SCHEDULES)
  _positive(config, "optim.lr")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", o.weight_decay, "a non-negative coefficient")
  if o.warmup_epochs < 0:
    _fail("optim.warmup_epochs", o.warmup_epochs, "a number of epochs >= 0")
  if o.warmup_epochs > 0 and o.warmup_start_lr < 0:
    _fail("optim.warmup_start_lr", o.warmup_start_lr, "a learning rate >= 0")
  if o.schedule == "warmup_multistep":
    decay = tuple(o.decay_epochs)
    if list(decay) != sorted(decay) or any(e < o.warmup_epochs for e in decay):
      _fail("optim.decay_epochs", decay, f"ascending epochs, none before the end of the warm-up "
            f"(optim.warmup_epochs={o.warmup_epochs})")
    if not 0.0 < o.decay_factor <= 1.0:
      _fail("optim.decay_factor", o.decay_factor, "a factor in (0, 1]")
  momentum = o.get("momentum", 0.9)  # checked for every optimiser: a later switch to sgd must not meet it
  if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
    _fail("optim.momentum", momentum, "a momentum in [0, 1)")
  min_lr = o.get("min_lr", 0.0)  # configs saved before the cosine schedule have none
  if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not 0.0 <= min_lr <= o.lr:
    _fail("optim.min_lr", min_lr, f"a learning rate in [0, optim.lr={o.lr}]")
  if o.name in ("adam", "adamw"):
    for field in ("b1", "b2"):
      if not 0.0 <= o[field] < 1.0:
        _fail(f"optim.{field}", o[field], "a decay rate in [0, 1)")
    _positive(config, "optim.eps")
  if not isinstance(o.param_groups, (tuple, list)) or not o.param_groups:
    _fail("optim.param_groups", o.param_groups, "at least one (regex, LR multiplier or 'frozen') rule, e.g. "
          "(('backbone', 0.1), ('.*', 1.0))")
  try:
    optim._rules(o, "backbone")
  except ValueError as error:
    raise ConfigError(str(error)) from None


def _integer(config, field: str, minimum: int, *, allow=(), maximum: Any = None) -> None:
  """An integer >= `minimum` (and <= `maximum`), or one of the special values in `allow`."""
  value = _get(config, field)
  if value in allow and not isinstance(value, bool):
    return
  if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
      or (maximum is not None and value > maximum)):
    special = f", or {', '.join(map(repr, allow))}" if allow else ""
    upper = f" and <= {maximum}" if maximum is not None else ""
    _fail(field, value, f"an integer >= {minimum}{upper}{special}")


def _in_range(config, field: str, low: float, high: float) -> None:
  """A number in [low, high]."""
  value = _get(config, field)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
    _fail(field, value, f"a number in [{low}, {high}]")


def _check_data_fields(config) -> None:
  """The data fields beyond name, kind, sizes, erasing and P x K."""
  from data_pipelines import datasets, image_check
  d = config.data
  jitter = d.color_jitter
  if (not isinstance(jitter, (tuple, list)) or len(jitter) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in jitter)
      or jitter[3] > 0.5):
    _fail("data.color_jitter", jitter, "(brightness, contrast, saturation, hue), each >= 0, hue <= 0.5")
  _integer(config, "data.num_parallel_calls", 1, allow=(-1,))
  _one_of(config, "data.bad_images", image_check.POLICIES)
  _check_source(config)
  info = datasets.DATASETS[d.name]
  valid = {**info.options, **datasets.COMMON_OPTIONS}
  for key in d.options:
    if key not in valid:
      _fail(f"data.options.{key}", d.options[key],
            f"an option of dataset {d.name!r}: {', '.join(sorted(valid)) or 'it takes none'}")


def _check_source(config) -> None:
  """`data.source` and, for "tfds", that `data.tfds_dir` holds the prepared config of the dataset."""
  from data_pipelines import SOURCES
  # Configs saved before these fields existed read their images from the files.
  source, tfds_dir = config.data.get("source", "files"), config.data.get("tfds_dir", "")
  if source not in SOURCES:
    _fail("data.source", source, "one of " + ", ".join(repr(c) for c in SOURCES))
  if not isinstance(tfds_dir, str):
    _fail("data.tfds_dir", tfds_dir, "a TFDS data_dir, any tf.io path (\"\" = ~/tensorflow_datasets)")
  if source == "files" and tfds_dir:  # set for TFRecords, yet the files would be read: say so
    _fail("data.tfds_dir", tfds_dir, "'' with --config.data.source=files (add --config.data.source=tfds to "
          "read the TFRecords prepared there)")
  if source == "tfds":
    from data_pipelines.tfds import laga_reid  # Deferred: TFDS is only imported for this source.
    missing = laga_reid.missing_preparation(tfds_dir, laga_reid.config_name(config.data.name,
                                                                            config.data.options.to_dict()))
    if missing:
      _fail("data.tfds_dir", tfds_dir, f"the TFDS data_dir of --config.data.source=tfds: {missing}")


def _check_train_eval_fields(config) -> None:
  """The train and eval fields beyond epochs, steps, devices, logging and the eval sizes."""
  _integer(config, "train.seed", 0, maximum=2 ** 31 - 1)
  _integer(config, "train.checkpoint_every_epochs", 1)
  _check_distributed(config)
  _integer(config, "eval.rerank_k1", 1)
  _integer(config, "eval.rerank_k2", 1)
  _in_range(config, "eval.rerank_lambda", 0.0, 1.0)
  _integer(config, "eval.num_figures", 0)
  _integer(config, "eval.figure_topk", 1)
  spec = str(config.eval.get("datasets", "") or "").strip()
  if spec:
    from data_pipelines import datasets
    names = [entry.partition("=")[0].strip() for entry in spec.split(",")]
    if any(n not in datasets.DATASETS for n in names) or len(set(names)) != len(names):
      _fail("eval.datasets", spec, "registered dataset names, comma separated, each once, each optionally "
            f"name=root; names: {', '.join(datasets.DATASETS)}")


def _check_distributed(config) -> None:
  """The `jax.distributed.initialize` fields (read only with `train.distributed`, checked always so that a
  typo is caught before the job is launched on many hosts)."""
  t = config.train
  address = str(t.get("coordinator_address", ""))
  host, _, port = address.rpartition(":")
  if address and not (host and port.isdigit() and 0 < int(port) < 65536):
    _fail("train.coordinator_address", address, "'host:port' of process 0 (e.g. '127.0.0.1:12355'), or '' "
          "to auto-detect it")
  for field, minimum in (("num_processes", 1), ("process_id", 0), ("initialization_timeout", 1)):
    if field in t:  # configs saved before these fields existed have none
      _integer(config, f"train.{field}", minimum, allow=() if field == "initialization_timeout" else (-1,))
  if t.get("num_processes", -1) > 0 and t.get("process_id", -1) >= t.num_processes:
    _fail("train.process_id", t.process_id, f"an id in [0, train.num_processes={t.num_processes})")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` for the first field whose value cannot work."""
  from data_pipelines import datasets  # Deferred: keeps `import laga_jax` free of TensorFlow.

  _one_of(config, "mode", MODES)
  from laga_jax import models
  try:
    model = models.get_model(config.model.get("name", ""))
  except ValueError as error:
    raise ConfigError(str(error)) from None
  model.validate(config.model)

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
  _check_data_fields(config)
  _check_loss(config, model)
  _check_optim(config)

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
  _check_train_eval_fields(config)
