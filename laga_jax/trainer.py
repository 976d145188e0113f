"""The training loop: data, model, optimiser, checkpoints and logging around `laga_jax.train.train_step`."""

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import checkpoint as checkpoint_lib
from laga_jax import config_utils, models, optim, parallel, safeguards, weights
from laga_jax import train as train_lib
from laga_jax.logging_utils import MetricWriter, ProgressBar, result_figures

log = logging.getLogger("laga_jax")


@dataclasses.dataclass
class Experiment:
  """Everything a run derives from its config once: data splits, model, devices, step counts."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  splits: dict
  num_classes: int
  model: Any           # train-mode model (BatchNorm synchronised over the data axis)
  eval_model: Any      # the same parameters, no collectives (feature extraction, search)
  data_parallel: parallel.DataParallel
  steps_per_epoch: int
  total_steps: int
  feature_fn: Any      # (variables, images) -> (B, D) un-normalised eval features, one object per run
  model_module: Any = None   # the registry module of config.model.name


def eval_feature_fn(model_module, model):
  """(variables, images) -> the model's un-normalised retrieval feature (its module's `eval_features`)."""
  def feature_fn(variables, images):
    return model_module.eval_features(model.apply(variables, images, train=False))
  return feature_fn


# A train state carries its model's `apply` and its optimiser as static pytree metadata, which jit compares
# by identity. Later runs in one process (notebooks, sweeps, tests) with the same settings are given the same
# model and optimiser objects, so their states match the steps `_compiled_steps` already traced and compiled.
_MODELS: dict = {}
_OPTIMIZERS: dict = {}


def build_models(config: ml_collections.ConfigDict, num_classes: int) -> tuple:
  """(registry module, train-mode model with BatchNorm synchronised over the data axis, eval model)."""
  key = (config.model.to_json_best_effort(sort_keys=True), num_classes)
  if key not in _MODELS:
    module = models.get_model(config.model.name)
    _MODELS[key] = (module, module.build(config.model, num_classes, bn_axis_name=parallel.DATA_AXIS),
                    module.build(config.model, num_classes))
  return _MODELS[key]


def _dataset_records(config: ml_collections.ConfigDict, *, eval_only: bool = False, **option_overrides) -> dict:
  """The checked splits of `config.data`; with `eval_only` query and gallery only (no training split read,
  checked or required: a test-only copy of a dataset evaluates)."""
  from data_pipelines import datasets
  from data_pipelines import image_check
  options = dict(config.data.options.to_dict(), **option_overrides)
  def load():
    if config.data.get("source", "files") == "tfds":  # the records and their images from the TFRecords alone
      from data_pipelines.tfds import laga_reid
      return laga_reid.load_records(str(config.data.get("tfds_dir", "")),
                                    laga_reid.config_name(config.data.name, options), str(config.data.root or "."),
                                    eval_only=eval_only)
    splits = datasets.load_splits(config.data.name, config.data.root, eval_only=eval_only, **options)
    # Every image decoded once up front (cached): a bad file stops the run here, not after the training.
    return image_check.check_splits(splits, dataset=config.data.name, root=config.data.root,
                                    policy=config.data.get("bad_images", "stop"))

  if jax.process_count() == 1:
    return load()
  # Process 0 first: it generates a demo set that is missing and fills the image-check cache, which the
  # other processes then read instead of writing the same files at the same time.
  from jax.experimental import multihost_utils
  splits = load() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"laga_jax: {config.data.name} parsed by process 0")
  return splits if splits is not None else load()


def setup(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Validate the config, parse the dataset and build the models and the device mapping."""
  config_utils.validate_config(config)
  parallel.initialize_distributed(config.train)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  splits = _dataset_records(config)
  # TensorFlow (~4 s of start-up) only once the config and the dataset have passed their checks: a typo or a
  # missing folder is reported at once.
  from data_pipelines import input_pipeline
  if not splits["train"]:
    raise ValueError(f"dataset {config.data.name!r} at {config.data.root!r} has no training images")
  num_classes = len({r.label for r in splits["train"]})
  devices = parallel.local_devices(config.train.num_devices)
  data_parallel = parallel.DataParallel(config.train.parallel, devices)
  global_batch = config.data.p * config.data.k
  if global_batch % data_parallel.num_devices:
    raise config_utils.ConfigError(
        f"--config.data.p * --config.data.k = {global_batch} images per batch cannot be split evenly over "
        f"{data_parallel.num_devices} devices; change P, K or --config.train.num_devices")
  steps_per_epoch = config.train.steps_per_epoch
  if steps_per_epoch == -1:
    steps_per_epoch = input_pipeline.steps_per_epoch(len(splits["train"]), config.data.p, config.data.k)
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  module, model, eval_model = build_models(config, num_classes)
  return Experiment(config, workdir, splits, num_classes, model, eval_model, data_parallel,
                    steps_per_epoch, total_steps, eval_feature_fn(module, eval_model), module)


@functools.lru_cache(maxsize=8)
def _init_fn(model, image_size: tuple):
  """The jitted initialiser of `model` for one input size, compiled once per process."""
  dummy = jnp.zeros((1,) + image_size + (3,), jnp.float32)
  return jax.jit(lambda rng: model.init(rng, dummy, train=False))


def _init_from(variables: dict, workdir: str) -> dict:
  """Every parameter and BN statistic of `variables` that the checkpoint in `workdir` has with the same
  shape, taken from it (e.g. PCB's trained trunk and parts for the RPP stage); the rest keep their init."""
  import flax
  source = checkpoint_lib.Checkpointer(workdir, {}, keep=1)
  try:
    best = source.best_step() is not None
    step = source.best_step() if best else source.latest_step()
    if step is None:
      raise FileNotFoundError(f"--config.model.init_from={workdir}: no checkpoint under checkpoints/ or best/")
    tree = source.restore_raw(step, best=best)
  finally:
    source.close()
  saved = flax.traverse_util.flatten_dict({c: tree[c] for c in ("params", "batch_stats") if c in tree})
  flat = flax.traverse_util.flatten_dict(variables)
  taken = 0
  for path, leaf in flat.items():
    if path in saved and tuple(np.shape(saved[path])) == tuple(leaf.shape):
      flat[path] = jnp.asarray(saved[path], leaf.dtype)
      taken += 1
  if taken == 0:
    raise ValueError(f"--config.model.init_from={workdir}: its checkpoint shares no parameter with this model")
  log.info("initialised %d of %d arrays from %s (step %d)", taken, len(flat), workdir, step)
  return flax.traverse_util.unflatten_dict(flat)


def initial_variables(exp: Experiment, rng: jax.Array) -> dict:
  """Random initialisation, then the pretrained ImageNet backbone and `init_from` checkpoint if given."""
  # The losses' parameters draw from a key derived from `rng`, which itself stays the model's (so adding a
  # loss never changes a model's initialisation).
  loss_rng = jax.random.fold_in(rng, 1)
  variables = _init_fn(exp.eval_model, tuple(exp.config.data.image_size))(rng)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if exp.config.model.get("pretrained", ""):
    state_dict = weights.load_state_dict(exp.config.model.pretrained)
    variables = exp.model_module.pretrained_variables(state_dict, variables, exp.config.model)
  if exp.config.model.get("init_from", ""):
    variables = _init_from(variables, exp.config.model.init_from)
  loss_params = initial_loss_params(exp, variables, loss_rng)
  if loss_params:
    variables["params"] = dict(variables["params"], **{optim.LOSS_PARAMS: loss_params})
  return variables


def initial_loss_params(exp: Experiment, variables: dict, rng: jax.Array) -> dict:
  """The losses' own parameters: the center loss's centers, N(0, 1) as in BoT's reference (taps, C, D)."""
  center = exp.config.loss.get("center")
  if center is None or center.weight <= 0:
    return {}
  dummy = jnp.zeros((2,) + tuple(exp.config.data.image_size) + (3,), jnp.float32)
  shape = jax.eval_shape(lambda v: exp.eval_model.apply(v, dummy, train=False), variables)
  tap = shape[center.feature].shape
  return {"centers": jax.random.normal(rng, (tap[0], exp.num_classes, tap[2]), jnp.float32)}


def make_optimizer(exp: Experiment):
  """The configured optimiser over the model's parameter groups (and the losses' own parameters)."""
  config = exp.config
  key = (config.optim.to_json_best_effort(sort_keys=True), config.loss.to_json_best_effort(sort_keys=True),
         exp.steps_per_epoch, config.train.num_epochs, exp.model_module.BACKBONE_PATTERN)
  if key not in _OPTIMIZERS:
    _OPTIMIZERS[key] = optim.make_optimizer(config.optim, exp.steps_per_epoch,
                                            backbone_pattern=exp.model_module.BACKBONE_PATTERN,
                                            num_epochs=config.train.num_epochs, loss_cfg=config.loss)
  return _OPTIMIZERS[key]


def create_state(exp: Experiment) -> train_lib.TrainState:
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(exp.config.train.seed))
  variables = initial_variables(exp, init_rng)
  # Check the parameter groups now, with the paths named, rather than at the first traced step.
  optim.param_labels(variables["params"], exp.config.optim, exp.model_module.BACKBONE_PATTERN)
  return train_lib.create_train_state(exp.model, make_optimizer(exp), variables, dropout_rng)


def _host_metrics(metrics: list) -> list:
  """Per-step metrics as JSON-ready floats (a per-device metric averaged over its devices)."""
  return [{k: float(np.mean(v)) for k, v in m.items()} for m in jax.device_get(metrics)]


def _average(metrics: list) -> dict:
  """The mean over steps of each per-step metric."""
  steps = _host_metrics(metrics)
  return {k: float(np.mean([m[k] for m in steps])) for k in steps[0]}


def validation_accuracy(exp: Experiment, state: train_lib.TrainState, val_step) -> Optional[float]:
  """Accuracy on the held-out image per training identity (hand sets); None when there is no val split."""
  from data_pipelines import input_pipeline
  records = exp.splits.get("val") or []
  if not records:
    return None
  labels = np.asarray([r.label for r in records], np.int32)
  batch_size = exp.config.eval.batch_size - exp.config.eval.batch_size % exp.data_parallel.num_devices
  correct = count = 0.0
  dataset = input_pipeline.eval_batches(records, exp.config.data, max(batch_size, exp.data_parallel.num_devices))
  for batch in dataset.as_numpy_iterator():
    batch = {"image": batch["image"], "mask": batch["mask"], "label": labels[batch["index"]]}
    out = val_step(state, exp.data_parallel.shard_batch(batch))
    correct += float(out["correct"])
    count += float(out["count"])
  return correct / max(count, 1.0)


_STEP_CACHE: dict = {}


def _compiled_steps(dp: parallel.DataParallel, loss_cfg: ml_collections.ConfigDict) -> tuple:
  """Train and validation steps, reused by later runs in the same process (notebooks, sweeps, tests)."""
  key = (dp.mode, tuple(d.id for d in dp.devices), loss_cfg.to_json())
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = (dp.compile(train_lib.make_train_step(loss_cfg)),
                        dp.compile(train_lib.make_val_step(), donate_state=False))
  return _STEP_CACHE[key]


def train(exp: Experiment, state: train_lib.TrainState, checkpointer: checkpoint_lib.Checkpointer,
          writer: MetricWriter) -> train_lib.TrainState:
  """Run (or resume) training until `exp.total_steps`; checkpoints at epoch ends and at the last step."""
  from data_pipelines import input_pipeline

  config = exp.config
  dp = exp.data_parallel
  step_fn, val_fn = _compiled_steps(dp, config.loss)
  state = dp.replicate(state)
  step = int(jax.device_get(state.step))
  if step >= exp.total_steps:
    log.info("nothing to train: checkpoint is at step %d of %d", step, exp.total_steps)
    return state
  meta = checkpointer.read_meta() or {}
  best_accuracy = meta.get("best_val_accuracy")
  images_per_step = config.data.p * config.data.k
  bar = ProgressBar(exp.total_steps, images_per_step=images_per_step, initial=step,
                    enabled=parallel.is_main_process())
  # A stop between two log lines carries the steps since the last line over, so the next line averages the
  # same steps as an uninterrupted run's.
  pending = list(meta.get("pending_metrics", [])) if meta.get("step") == step else []
  guard = safeguards.FiniteGuard(lambda: safeguards.last_checkpoint(checkpointer))

  def stop_here(reason: str):  # Ctrl-C or SIGTERM: save this step's state and stop, resumable exactly
    guard.flush()
    if checkpointer.latest_step() != step:
      checkpointer.save(step, dp.to_global(state.checkpoint_tree()),
                        {"epoch": step // exp.steps_per_epoch, "best_val_accuracy": best_accuracy,
                         "pending_metrics": _host_metrics(pending)})
    saved = f"saved {safeguards.last_checkpoint(checkpointer)} of {exp.total_steps}; run the same command to resume"
    if reason == "preempt":
      processes = f" on all {jax.process_count()} processes" if jax.process_count() > 1 else ""
      raise safeguards.TrainingPreempted(f"preempted (SIGTERM){processes}: {saved}")
    raise safeguards.TrainingInterrupted(f"interrupted by Ctrl-C: {saved}")
  # Decoded once per run, not per epoch; only worth it for large originals (11k hands are 1600×1200).
  decoded = (input_pipeline.DecodedImages.from_paths([r.path for r in exp.splits["train"]],
                                                     config.data.num_parallel_calls)
             if config.data.cache_decoded else None)
  stop = None
  while step < exp.total_steps:
    epoch, offset = divmod(step, exp.steps_per_epoch)
    num_steps = min(exp.steps_per_epoch - offset, exp.total_steps - step)
    batches = input_pipeline.train_batches(
        exp.splits["train"], config.data, seed=config.train.seed, epoch=epoch, start_step=offset,
        num_steps=num_steps, process_index=jax.process_index(), process_count=jax.process_count(),
        decoded=decoded)
    epoch_start = time.perf_counter()
    for batch in parallel.prefetch_to_device(batches.as_numpy_iterator(), dp.shard_batch):
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      step += 1
      guard.after_step(step, epoch, metrics)  # stops at the first non-finite loss, naming that step
      if step % config.train.log_every_steps == 0 or step % exp.steps_per_epoch == 0 \
          or step == exp.total_steps:
        guard.flush()
        scalars = _average(pending)
        pending = []
        if scalars.pop("finite") < 1.0:
          raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); last metrics {scalars}")
        scalars.update({f"lr_{k}": v for k, v in
                        optim.current_learning_rates(config.optim, step - 1, exp.steps_per_epoch,
                                                     config.train.num_epochs).items()})
        scalars["images_per_second"] = bar.steps_per_second() * images_per_step
        writer.write(step, scalars, epoch=epoch)
        bar.update(0, {k: scalars[k] for k in ("loss", "accuracy") if k in scalars})
      bar.update(1)
      stop = safeguards.stop_reason(step)  # the same answer on every process of a job
      if stop and step % exp.steps_per_epoch:
        stop_here(stop)
    guard.flush()
    epoch_done = step % exp.steps_per_epoch == 0
    accuracy = validation_accuracy(exp, state, val_fn) if epoch_done else None
    is_best = False
    if accuracy is not None:
      writer.write(step, {"val_accuracy": accuracy}, epoch=epoch)
      # Ties go to the later epoch, as the author's `>=` selection does.
      is_best = config.train.select_best and (best_accuracy is None or accuracy >= best_accuracy)
      if is_best:
        best_accuracy = accuracy
    last = step == exp.total_steps
    if last or (epoch_done and (epoch + 1) % config.train.checkpoint_every_epochs == 0) or is_best:
      checkpointer.save(step, dp.to_global(state.checkpoint_tree()),
                        {"epoch": epoch + int(epoch_done), "val_accuracy": accuracy,
                         "best_val_accuracy": best_accuracy, "epoch_seconds": time.perf_counter() - epoch_start},
                        best=is_best)
    if stop and step < exp.total_steps:
      stop_here(stop)
  return state


def eval_targets(config: ml_collections.ConfigDict) -> List[Tuple[str, ml_collections.ConfigDict]]:
  """(name, config) of every evaluation target: `config.eval.datasets` ("name" or "name=root", comma
  separated), or the training dataset when it is empty.

  Another dataset's root defaults to the folder beside `config.data.root` named as the dataset's own
  download (e.g. data/demo -> data/demo_b). Hand targets are scored over `config.eval.num_draws` draws when
  they are the training dataset, else over the 10 draws of the hand protocol.
  """
  from data_pipelines import datasets
  spec = str(config.eval.datasets or "").strip()
  if not spec:
    return [(config.data.name, config)]
  targets = []
  for entry in (e.strip() for e in spec.split(",")):
    name, _, root = entry.partition("=")
    name = name.strip()
    try:
      info = datasets.get_dataset_info(name)
    except ValueError as error:
      raise config_utils.ConfigError(f"--config.eval.datasets={spec!r}: {error}") from None
    target = config.copy_and_resolve_references()
    if name == config.data.name and not root:
      targets.append((name, target))
      continue
    target.data.name = name
    target.data.root = root.strip() or str(pathlib.Path(config.data.root or ".").parent / info.folder)
    target.data.kind = info.kind
    target.data.options = ml_collections.ConfigDict()
    if name != config.data.name:
      target.eval.num_draws = 10 if info.kind == "hand" else 1
    targets.append((name, target))
  names = [n for n, _ in targets]
  if len(set(names)) != len(names):
    raise config_utils.ConfigError(f"--config.eval.datasets={spec!r}: a dataset is listed twice")
  return targets


def _target_splits(target: ml_collections.ConfigDict, default: Optional[dict] = None) -> list:
  """The query/gallery splits to score: one split, or `num_draws` seeded draws (hand protocol). Only query
  and gallery are read (`eval_only`), so a target needs no training split."""
  if target.eval.num_draws == 1:
    return [default if default is not None else _dataset_records(target, eval_only=True)]
  return [_dataset_records(target, eval_only=True, draw=draw) for draw in range(target.eval.num_draws)]


def evaluate_targets(config: ml_collections.ConfigDict, workdir: pathlib.Path, feature_fn, variables: dict, *,
                     tag: str, mesh=None, default_splits: Optional[dict] = None,
                     only: Optional[set] = None, maps_model=None) -> dict:
  """Metrics on every evaluation target (features, per-query scores and figures in `workdir`).

  With `config.eval.datasets` empty: the training dataset's metrics, as a flat dict. Otherwise the first
  target's metrics at the top level and every target's under "targets" (files get a `_<name>` suffix
  except for the training dataset's). `only` restricts the targets evaluated (by name).
  """
  from laga_jax.evaluation import pipeline as eval_pipeline
  blocks = {}
  for name, target in eval_targets(config):
    if only is not None and name not in only:
      continue
    is_training_set = name == config.data.name and target.data.root == config.data.root
    suffix = "" if is_training_set else f"_{name}"
    splits = _target_splits(target, default_splits if is_training_set else None)
    blocks[name] = eval_pipeline.evaluate(target, splits, feature_fn, variables, workdir=str(workdir),
                                          tag=tag + suffix, mesh=mesh)
    blocks[name]["dataset"] = name
    if maps_model is not None and target.eval.num_figures > 0 and jax.process_index() == 0:
      from laga_jax.evaluation import maps
      # Process 0 alone draws: with host copies, not the arrays the job's devices share.
      local = jax.device_get(variables) if jax.process_count() > 1 else variables
      blocks[name]["maps_figure"] = maps.grid_for_records(
          maps_model, local, splits[0]["query"], target.data, str(workdir / f"maps_{tag}{suffix}.png"),
          num_images=min(6, target.eval.num_figures + 2), seed=target.train.seed)
  if not str(config.eval.datasets or "").strip():
    return blocks[config.data.name]
  if not blocks:
    return {}
  return dict(next(iter(blocks.values())), targets=blocks)


def evaluate(exp: Experiment, variables: dict, *, tag: str) -> dict:
  """The test protocol on `variables` over every evaluation target (see `evaluate_targets`)."""
  dp = exp.data_parallel
  return evaluate_targets(exp.config, exp.workdir, exp.feature_fn, variables, tag=tag,
                          mesh=dp.mesh if dp.num_devices > 1 else None, default_splits=exp.splits,
                          maps_model=exp.eval_model if tag == "final" else None)


def _write_results(workdir: pathlib.Path, results: dict) -> None:
  if jax.process_index() == 0:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


def load_trained_model(config: ml_collections.ConfigDict, workdir: pathlib.Path, *, mode: str) -> tuple:
  """(model module, eval model, variables, checkpoint meta, is_best) of the run in `workdir`: its best
  checkpoint if `train.select_best` kept one, else the latest; parameters only, no optimiser."""
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"--mode {mode}: no checkpoint under {workdir / 'checkpoints'}; "
                            "train first or point --workdir at a trained run")
  probe = checkpoint_lib.Checkpointer(str(workdir), {}, keep=1)
  try:
    best = bool(config.train.select_best) and probe.best_step() is not None
    meta = probe.read_meta(best=best)
  finally:
    probe.close()
  if meta is None:
    raise FileNotFoundError(f"--mode {mode}: no checkpoint under {workdir / 'checkpoints'}; "
                            "train first or point --workdir at a trained run")
  num_classes = int(meta["fingerprint"]["num_classes"])
  module, _, eval_model = build_models(config, num_classes)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), checkpoint_lib.fingerprint(config, num_classes),
                                             keep=config.train.keep_checkpoints)
  try:
    tree, meta = checkpointer.restore_params(best=best, parameters_only=True)
  finally:
    checkpointer.close()
  variables = {"params": train_lib.split_params(tree["params"])[0], "batch_stats": tree["batch_stats"]}
  return module, eval_model, variables, meta, best


def maps_workdir(config: ml_collections.ConfigDict, workdir: str, *, split: str = "query",
                 num_images: int = 6, query_position: Optional[Sequence] = None) -> str:
  """`--mode maps`: activation (and, for models with attention, attention) maps of `num_images` images of a
  split of the first evaluation target, drawn by the trained model of `workdir` into `maps_<split>.png`;
  `query_position` (row, col) is the SAM-RPE query on the attention map (default its centre)."""
  from laga_jax.evaluation import maps
  position = maps.parse_position(query_position)  # a malformed flag fails before the model is loaded
  workdir = pathlib.Path(workdir).absolute()
  _, eval_model, variables, _, _ = load_trained_model(config, workdir, mode="maps")
  name, target = eval_targets(config)[0]
  splits = _dataset_records(target, eval_only=split != "train",
                            **({"draw": 0} if target.eval.num_draws > 1 else {}))
  if split not in splits or not splits[split]:
    raise ValueError(f"--split {split}: dataset {name!r} has splits {', '.join(k for k in splits if splits[k])}")
  suffix = "" if name == config.data.name else f"_{name}"
  path = maps.grid_for_records(eval_model, variables, splits[split], target.data,
                               str(workdir / f"maps_{split}{suffix}.png"), num_images=num_images,
                               seed=config.train.seed, query_position=position)
  log.info("maps: %s", path)
  return path


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode eval`: the checkpoint of `workdir` (best if `train.select_best` and kept, else latest) on every
  evaluation target, without the training split or the optimiser.

  The checkpoint is refused only when the model's parameters differ (`checkpoint.parameter_fingerprint`):
  another dataset or other evaluation options are no mismatch.
  """
  workdir = pathlib.Path(workdir).absolute()
  parallel.initialize_distributed(config.train)
  module, eval_model, variables, meta, best = load_trained_model(config, workdir, mode="eval")
  num_classes = int(meta["fingerprint"]["num_classes"])
  devices = parallel.local_devices(config.train.num_devices)
  mesh = parallel.make_mesh(devices) if len(devices) > 1 else None
  feature_fn = eval_feature_fn(module, eval_model)
  results: dict = {"dataset": config.data.name, "config": json.loads(config.to_json_best_effort())}
  results.update(evaluate_targets(config, workdir, feature_fn, variables, tag="final", mesh=mesh,
                                  maps_model=eval_model))
  results["evaluated"] = {"checkpoint": "best" if best else "last", "step": meta["step"],
                          "epoch": meta.get("epoch"), "val_accuracy": meta.get("val_accuracy")}
  untrained = _untrained_results(config, workdir, module, eval_model, num_classes, feature_fn, mesh)
  if untrained:
    results["untrained"] = untrained
  _write_results(workdir, results)
  return results


def _untrained_results(config, workdir: pathlib.Path, module, eval_model, num_classes: int, feature_fn,
                       mesh) -> Optional[dict]:
  """The untrained model's metrics saved by training, completed for evaluation targets it lacks (when
  `eval.evaluate_untrained`): the same initialisation as the run's, so the comparison is fair."""
  path = workdir / "untrained_results.json"
  saved = json.loads(path.read_text()) if path.exists() else None
  if not config.eval.evaluate_untrained:
    return saved
  names = [n for n, _ in eval_targets(config)]
  have = set((saved or {}).get("targets", {})) | ({saved.get("dataset", config.data.name)} if saved else set())
  missing = [n for n in names if n not in have]
  if not missing:
    return saved
  exp = Experiment(config, workdir, {}, num_classes, eval_model, eval_model, None, 1, 0, feature_fn, module)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.train.seed))
  variables = initial_variables(exp, init_rng)
  variables = {"params": train_lib.split_params(variables["params"])[0], "batch_stats": variables["batch_stats"]}
  fresh = evaluate_targets(config, workdir, feature_fn, variables, tag="untrained", mesh=mesh, only=set(missing))
  merged = dict(saved or {})
  blocks = dict(merged.get("targets", {}))
  if saved and "targets" not in saved:
    blocks[saved.get("dataset", config.data.name)] = {k: v for k, v in saved.items() if k != "targets"}
  blocks.update(fresh.get("targets", {}) if "targets" in fresh else {missing[0]: fresh})
  if not merged:
    merged = dict(next(iter(blocks.values())))
  merged["targets"] = blocks
  if jax.process_index() == 0:
    path.write_text(json.dumps(merged, indent=2))
  return merged


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole job: (resume) training and/or evaluation per `config.mode`; returns and writes results.json."""
  if config.mode == "eval":
    return evaluate_workdir(config, workdir)
  exp = setup(config, workdir)
  state = create_state(exp)
  checkpointer = checkpoint_lib.Checkpointer(
      str(exp.workdir), checkpoint_lib.fingerprint(config, exp.num_classes), keep=config.train.keep_checkpoints)
  if jax.process_count() > 1:  # restored straight into the job's replicated layout, which orbax reads collectively
    state = exp.data_parallel.replicate_global(state)
  restored, meta = checkpointer.restore(state.checkpoint_tree())
  if restored is not None:
    state = state.replace_from_checkpoint(restored)
    log.info("resumed from %s at step %d (epoch %s)", exp.workdir / "checkpoints", int(state.step),
             meta.get("epoch"))
  if parallel.is_main_process():
    (exp.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = MetricWriter(str(exp.workdir), enabled=jax.process_index() == 0)
  results: dict = {"dataset": config.data.name, "config": json.loads(config.to_json_best_effort())}
  try:
    untrained_file = exp.workdir / "untrained_results.json"
    if config.mode in ("train", "train_eval"):
      if (config.eval.evaluate_untrained and config.mode == "train_eval" and int(state.step) == 0
          and not untrained_file.exists()):
        untrained = evaluate(exp, state.variables(), tag="untrained")
        if parallel.is_main_process():
          untrained_file.write_text(json.dumps(untrained, indent=2))
      # Ctrl-C or SIGTERM: finish the step, save, exit; a second Ctrl-C: exit at once.
      with safeguards.interrupt_for_job():
        state = train(exp, state, checkpointer, writer)
    if config.mode in ("eval", "train_eval"):
      variables = exp.data_parallel.to_global(state.variables())
      evaluated = {"checkpoint": "last", "step": int(jax.device_get(state.step))}
      if config.train.select_best and checkpointer.best_step() is not None:
        best_tree, best_meta = checkpointer.restore(state.checkpoint_tree(), best=True)
        variables = {"params": train_lib.split_params(best_tree["params"])[0],
                     "batch_stats": best_tree["batch_stats"]}
        evaluated = {"checkpoint": "best", "step": best_meta["step"], "epoch": best_meta.get("epoch"),
                     "val_accuracy": best_meta.get("val_accuracy")}
      results.update(evaluate(exp, variables, tag="final"))
      results["evaluated"] = evaluated
      writer.write_images(int(evaluated["step"]), result_figures(results))  # the pictures in TensorBoard too
      if untrained_file.exists():
        results["untrained"] = json.loads(untrained_file.read_text())
      _write_results(exp.workdir, results)
  finally:
    writer.close()
    checkpointer.close()
  return results
