"""`run.py --mode search`: rank a folder of images against a query image with a trained checkpoint."""

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import checkpoint as checkpoint_lib
from laga_jax import optim
from laga_jax import train as train_lib
from laga_jax.evaluation import features as features_lib
from laga_jax.evaluation import metrics
from laga_jax.models import laga_net

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
  """(eval model, variables) of the run in `workdir`: its best checkpoint if it has one, else the latest."""
  probe = checkpoint_lib.Checkpointer(workdir, {}, keep=1)
  best = probe.best_step() is not None
  meta = probe.read_meta(best=best)
  probe.close()
  if meta is None:
    raise FileNotFoundError(f"--workdir {workdir}: no checkpoint found under checkpoints/ or best/")
  num_classes = int(meta["fingerprint"]["num_classes"])
  model = laga_net.from_config(config.model, num_classes)
  height, width = config.data.image_size
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, height, width, 3)), train=False))(
      jax.random.PRNGKey(0))
  state = train_lib.create_train_state(model, optim.make_optimizer(config.optim, 1),
                                       {"params": variables["params"], "batch_stats": variables["batch_stats"]},
                                       jax.random.PRNGKey(0))
  ckpt = checkpoint_lib.Checkpointer(workdir, checkpoint_lib.fingerprint(config, num_classes), keep=1)
  tree, _ = ckpt.restore(state.checkpoint_tree(), best=best)
  ckpt.close()
  return model, {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def run_search(config: ml_collections.ConfigDict, workdir: str, *, query: Optional[str],
               gallery_dir: Optional[str], topk: int = 10) -> list:
  """Print and save (`<workdir>/search_results.json`) the `topk` gallery images closest to `query`."""
  from data_pipelines import input_pipeline

  if not query or not pathlib.Path(query).is_file():
    raise FileNotFoundError(f"--query {query!r}: give an existing image file")
  if not gallery_dir:
    raise FileNotFoundError("--gallery_dir: give the folder of images to search")
  gallery = _gallery_images(gallery_dir)
  model, variables = load_trained_variables(config, workdir)

  def feature_fn(v, images):
    return laga_net.eval_features(model.apply(v, images, train=False))

  records = [_Image(query)] + [_Image(p) for p in gallery]
  batches = input_pipeline.eval_batches(records, config.data, config.eval.batch_size)
  feats = features_lib.extract_features(feature_fn, variables, batches.as_numpy_iterator(),
                                        num_images=len(records))
  distance = np.asarray(metrics.cosine_distance(feats[:1], feats[1:]))[0]
  order = np.argsort(distance, kind="stable")[:topk]
  matches = [{"rank": i + 1, "path": gallery[j], "cosine_similarity": float(1 - distance[j])}
             for i, j in enumerate(order)]
  for match in matches:
    print(f"{match['rank']:3d}  {match['cosine_similarity']:.4f}  {match['path']}")
  out = pathlib.Path(workdir) / "search_results.json"
  out.write_text(json.dumps({"query": query, "gallery_dir": gallery_dir, "matches": matches}, indent=2))
  print(f"saved {out}")
  return matches
