"""The training loop: data, model, optimiser, checkpoints and logging around `laga_jax.train.train_step`."""

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import checkpoint as checkpoint_lib
from laga_jax import config_utils, optim, parallel, weights
from laga_jax import train as train_lib
from laga_jax.logging_utils import MetricWriter, ProgressBar
from laga_jax.models import laga_net

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
  feature_fn: Any      # (variables, images) -> (B, num_heads * 2048) eval features, one object per run


def eval_feature_fn(model):
  """The model's un-normalised 12288-d eval feature (six pooled vectors, concatenated)."""
  def feature_fn(variables, images):
    return laga_net.eval_features(model.apply(variables, images, train=False))
  return feature_fn


def _dataset_records(config: ml_collections.ConfigDict, **option_overrides) -> dict:
  from data_pipelines import datasets
  options = dict(config.data.options.to_dict(), **option_overrides)
  return datasets.load_splits(config.data.name, config.data.root, **options)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Validate the config, parse the dataset and build the models and the device mapping."""
  from data_pipelines import input_pipeline

  config_utils.validate_config(config)
  if config.train.distributed:
    jax.distributed.initialize()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  splits = _dataset_records(config)
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
  model = laga_net.from_config(config.model, num_classes, bn_axis_name=parallel.DATA_AXIS)
  eval_model = laga_net.from_config(config.model, num_classes)
  return Experiment(config, workdir, splits, num_classes, model, eval_model, data_parallel,
                    steps_per_epoch, total_steps, eval_feature_fn(eval_model))


@functools.lru_cache(maxsize=8)
def _init_fn(model, image_size: tuple):
  """The jitted initialiser of `model` for one input size, compiled once per process."""
  dummy = jnp.zeros((1,) + image_size + (3,), jnp.float32)
  return jax.jit(lambda rng: model.init(rng, dummy, train=False))


def initial_variables(exp: Experiment, rng: jax.Array) -> dict:
  """Random initialisation, then the pretrained backbone (stem..layer3 and every layer4 copy) if given."""
  variables = _init_fn(exp.eval_model, tuple(exp.config.data.image_size))(rng)
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if exp.config.model.pretrained:
    state_dict = weights.load_state_dict(exp.config.model.pretrained)
    variables = weights.laga_net_variables(state_dict, variables)
  return variables


def create_state(exp: Experiment) -> train_lib.TrainState:
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(exp.config.train.seed))
  variables = initial_variables(exp, init_rng)
  tx = optim.make_optimizer(exp.config.optim, exp.steps_per_epoch)
  return train_lib.create_train_state(exp.model, tx, variables, dropout_rng)


def _average(metrics: list) -> dict:
  stacked = jax.device_get(metrics)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


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
  bar = ProgressBar(exp.total_steps, images_per_step=images_per_step, initial=step)
  pending = []
  # Decoded once per run, not per epoch; only worth it for large originals (11k hands are 1600×1200).
  decoded = (input_pipeline.DecodedImages.from_paths([r.path for r in exp.splits["train"]],
                                                     config.data.num_parallel_calls)
             if config.data.cache_decoded else None)
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
      if step % config.train.log_every_steps == 0 or step % exp.steps_per_epoch == 0 \
          or step == exp.total_steps:
        scalars = _average(pending)
        pending = []
        if scalars.pop("finite") < 1.0:
          raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); last metrics {scalars}")
        scalars.update({f"lr_{k}": v for k, v in
                        optim.current_learning_rates(config.optim, step - 1, exp.steps_per_epoch).items()})
        scalars["images_per_second"] = bar.steps_per_second() * images_per_step
        writer.write(step, scalars, epoch=epoch)
        bar.update(0, {k: scalars[k] for k in ("loss", "accuracy") if k in scalars})
      bar.update(1)
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
      checkpointer.save(step, state.checkpoint_tree(),
                        {"epoch": epoch + int(epoch_done), "val_accuracy": accuracy,
                         "best_val_accuracy": best_accuracy, "epoch_seconds": time.perf_counter() - epoch_start},
                        best=is_best)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole job: (resume) training and/or evaluation per `config.mode`; returns and writes results.json."""
  from laga_jax.evaluation import pipeline as eval_pipeline

  exp = setup(config, workdir)
  state = create_state(exp)
  checkpointer = checkpoint_lib.Checkpointer(
      str(exp.workdir), checkpoint_lib.fingerprint(config, exp.num_classes), keep=config.train.keep_checkpoints)
  restored, meta = checkpointer.restore(state.checkpoint_tree())
  if restored is not None:
    state = state.replace_from_checkpoint(restored)
    log.info("resumed from %s at step %d (epoch %s)", exp.workdir / "checkpoints", int(state.step),
             meta.get("epoch"))
  (exp.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = MetricWriter(str(exp.workdir), enabled=jax.process_index() == 0)
  results: dict = {"dataset": config.data.name, "config": json.loads(config.to_json_best_effort())}
  try:
    untrained_file = exp.workdir / "untrained_results.json"
    if config.mode in ("train", "train_eval"):
      if (config.eval.evaluate_untrained and config.mode == "train_eval" and int(state.step) == 0
          and not untrained_file.exists()):
        untrained = eval_pipeline.evaluate(exp, state.variables(), tag="untrained")
        untrained_file.write_text(json.dumps(untrained, indent=2))
      state = train(exp, state, checkpointer, writer)
    if config.mode in ("eval", "train_eval"):
      if config.mode == "eval" and restored is None:
        raise FileNotFoundError(f"--mode eval: no checkpoint under {exp.workdir / 'checkpoints'}; "
                                "train first or point --workdir at a trained run")
      variables = state.variables()
      evaluated = {"checkpoint": "last", "step": int(jax.device_get(state.step))}
      if config.train.select_best and checkpointer.best_step() is not None:
        best_tree, best_meta = checkpointer.restore(state.checkpoint_tree(), best=True)
        variables = {"params": best_tree["params"], "batch_stats": best_tree["batch_stats"]}
        evaluated = {"checkpoint": "best", "step": best_meta["step"], "epoch": best_meta.get("epoch"),
                     "val_accuracy": best_meta.get("val_accuracy")}
      results.update(eval_pipeline.evaluate(exp, variables, tag="final"))
      results["evaluated"] = evaluated
      if untrained_file.exists():
        results["untrained"] = json.loads(untrained_file.read_text())
      if jax.process_index() == 0:
        (exp.workdir / "results.json").write_text(json.dumps(results, indent=2))
  finally:
    writer.close()
    checkpointer.close()
  return results
