"""LAGA-Net in JAX: train, evaluate or search.

  python run.py --config configs/demo.py --workdir runs/demo
  python run.py --config configs/market.py --workdir runs/market --config.data.root=/data/Market-1501
  python run.py --config configs/market.py --workdir runs/market --mode eval
  python run.py --config configs/demo.py --workdir runs/demo --mode eval --config.eval.datasets=demo,demo_b
  python run.py --config configs/demo.py --workdir runs/demo --mode maps --split query --num_images 6
  python run.py --config runs/market/config.json --workdir runs/market --mode index --gallery_dir camera_dump/
  python run.py --config runs/market/config.json --workdir runs/market --mode search --query me.jpg --topk 10
  python run.py --config runs/market/config.json --workdir runs/market --mode export

eval, search, index and export on a trained workdir use its saved config.json (overrides still apply).

Any config field can be overridden with --config.<field>=<value>; see configs/base.py for all of them.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data; keep its start-up quiet.
# TensorFlow's oneDNN kernels (on by default on x86) print a notice at import, before any log level applies,
# and round the input pipeline's image resizing a little differently from its default kernels, which
# training amplifies into a few queries of the demo; off, every CPU computes the same images.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from laga_jax import cli_errors, saved_config  # noqa: E402  (light: no JAX)

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, features and results.json.")
flags.DEFINE_enum("mode", None, ["train", "eval", "train_eval", "search", "maps", "index", "export"],
                  "Overrides config.mode: train, eval (latest/best checkpoint, on config.eval.datasets), "
                  "train_eval, search, maps (activation/attention maps of a split), index (a gallery folder's "
                  "features, for search), export (SavedModel, StableHLO, ONNX into <workdir>/export).")
flags.DEFINE_multi_string("query", None, "--mode search: a query image or a folder of them (repeatable).")
flags.DEFINE_multi_string("gallery_dir", None, "--mode index (and search): folder of gallery images, searched "
                          "recursively, added to the index (repeatable).")
flags.DEFINE_string("index", None, "--mode index/search: the index file (default <workdir>/index.npz).")
flags.DEFINE_bool("rebuild_index", False, "--mode index/search: start the index afresh (another model).")
flags.DEFINE_integer("topk", 10, "--mode search: number of matches to print and save.")
flags.DEFINE_string("split", "query", "--mode maps: the split whose images are drawn (query, gallery, train).")
flags.DEFINE_integer("num_images", 6, "--mode maps: number of images (rows of the grid).")
flags.DEFINE_list("query_position", None, "--mode maps: row,col of the SAM-RPE query on its attention map "
                  "(default the centre).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli_errors.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
  # Our own progress at INFO; libraries (orbax logs every save through absl) only from WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  project_log = logging.getLogger("laga_jax")
  project_log.setLevel(logging.INFO)
  project_log.addHandler(handler)
  project_log.propagate = False
  try:
    from laga_jax import trainer, workdir_lock  # Imported after flag parsing: JAX/TF start-up is slow.
  except KeyboardInterrupt as error:
    cli_errors.report(error)

  config = FLAGS.config
  if FLAGS.mode:
    with config.unlocked():
      config.mode = FLAGS.mode
  try:
    config = saved_config.for_workdir(config, FLAGS.workdir, config.mode,
                                      config_flags.get_override_values(FLAGS["config"]))
    if config.mode in ("index", "search", "export"):
      from laga_jax import export, index
      if config.mode == "export":
        export.export_workdir(config, FLAGS.workdir)
      elif config.mode == "index":
        index.index_workdir(config, FLAGS.workdir, gallery_dirs=FLAGS.gallery_dir or [], index_path=FLAGS.index,
                            rebuild=FLAGS.rebuild_index)
      else:
        index.search_workdir(config, FLAGS.workdir, queries=FLAGS.query or [], index_path=FLAGS.index,
                             gallery_dirs=FLAGS.gallery_dir or [], topk=FLAGS.topk, rebuild=FLAGS.rebuild_index)
      return
    if config.mode == "maps":
      path = trainer.maps_workdir(config, FLAGS.workdir, split=FLAGS.split, num_images=FLAGS.num_images,
                                  query_position=FLAGS.query_position)
      print(f"maps: {path}")
      return
    # A multi-process job starts here, before JAX touches a device (train.distributed, docs/distributed.md).
    import jax  # already loaded by the trainer
    if trainer.parallel.initialize_distributed(config.train):
      project_log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
                       jax.local_device_count(), jax.device_count())
      if jax.process_index() > 0:  # one voice per job: the others report only warnings and errors
        project_log.setLevel(logging.WARNING)
    with workdir_lock.WorkdirLock(FLAGS.workdir, command=" ".join(sys.argv),
                                  process_id=jax.process_index()):  # one run per workdir
      results = trainer.train_and_evaluate(config, FLAGS.workdir)
  except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure ends in one line
    cli_errors.report(error)  # LAGA_DEBUG=1 re-raises (traceback)
  if "rank1" in results and jax.process_index() == 0:
    line = f"rank-1 {100 * results['rank1']:.2f}%  mAP {100 * results['mAP']:.2f}%"
    if "untrained" in results:
      u = results["untrained"]
      line += f"   (untrained: rank-1 {100 * u['rank1']:.2f}%  mAP {100 * u['mAP']:.2f}%)"
    print(line)
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli_errors.parse_flags(saved_config.json_config_argv(argv)))
