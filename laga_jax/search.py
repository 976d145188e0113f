"""Searching a folder for one query image (`run_search`); `run.py --mode search/index` use `laga_jax.index`."""

import dataclasses
import json
import pathlib
from typing import Optional

import ml_collections
import numpy as np

from laga_jax import checkpoint as checkpoint_lib
from laga_jax import models
from laga_jax import train as train_lib
from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import metrics

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(frozen=True)
class _Image:
  path: str


def _gallery_images(gallery_dir: str) -> list:
  root = pathlib.Path(gallery_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"--gallery_dir {gallery_dir}: not a folder")
  paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise FileNotFoundError(f"--gallery_dir {gallery_dir}: no {'/'.join(IMAGE_SUFFIXES)} images found (searched recursively)")
  return paths


def load_trained_variables(config: ml_collections.ConfigDict, workdir: str) -> tuple:
  """(model module, eval model, variables) of the run in `workdir`: its best checkpoint if it has one, else the latest."""
  probe = checkpoint_lib.Checkpointer(workdir, {}, keep=1)
  best = probe.best_step() is not None
  meta = probe.read_meta(best=best)
  probe.close()
  if meta is None:
    raise FileNotFoundError(f"--workdir {workdir}: no checkpoint found under checkpoints/ or best/")
  num_classes = int(meta["fingerprint"]["num_classes"])
  module = models.get_model(config.model.name)
  model = module.build(config.model, num_classes)
  ckpt = checkpoint_lib.Checkpointer(workdir, checkpoint_lib.fingerprint(config, num_classes), keep=1)
  try:
    tree, _ = ckpt.restore_params(best=best)
  finally:
    ckpt.close()
  return module, model, {"params": train_lib.split_params(tree["params"])[0], "batch_stats": tree["batch_stats"]}


def run_search(config: ml_collections.ConfigDict, workdir: str, *, query: Optional[str],
               gallery_dir: Optional[str], topk: int = 10) -> list:
  """Print and save (`<workdir>/search_results.json`) the `topk` gallery images closest to `query`: the
  folder is indexed (incrementally, `laga_jax.index`) and the index searched."""
  from laga_jax import index
  summary = index.search_workdir(config, workdir, queries=[query] if query else [],
                                 gallery_dirs=[gallery_dir] if gallery_dir else [], topk=topk)
  return summary["results"][0]["matches"]
