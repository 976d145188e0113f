"""LAGA-Net in JAX: train, evaluate or search.

  python run.py --config configs/demo.py --workdir runs/demo
  python run.py --config configs/market.py --workdir runs/market --config.data.root=/data/Market-1501
  python run.py --config configs/market.py --workdir runs/market --mode eval
  python run.py --config configs/market.py --workdir runs/market --mode search \
      --query path/to/query.jpg --gallery_dir path/to/folder --topk 10

Any config field can be overridden with --config.<field>=<value>; see configs/base.py for all of them.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data; keep its start-up quiet.

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, features and results.json.")
flags.DEFINE_enum("mode", None, ["train", "eval", "train_eval", "search"],
                  "Overrides config.mode: train, eval (latest/best checkpoint), train_eval, search.")
flags.DEFINE_string("query", None, "--mode search: the query image.")
flags.DEFINE_string("gallery_dir", None, "--mode search: folder of gallery images (searched recursively).")
flags.DEFINE_integer("topk", 10, "--mode search: number of matches to print and save.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Our own progress at INFO; libraries (orbax logs every save through absl) only from WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  project_log = logging.getLogger("laga_jax")
  project_log.setLevel(logging.INFO)
  project_log.addHandler(handler)
  project_log.propagate = False
  from laga_jax import search, trainer  # Imported after flag parsing: JAX/TF start-up is slow.

  config = FLAGS.config
  if FLAGS.mode:
    with config.unlocked():
      config.mode = FLAGS.mode
  try:
    if config.mode == "search":
      search.run_search(config, FLAGS.workdir, query=FLAGS.query, gallery_dir=FLAGS.gallery_dir,
                        topk=FLAGS.topk)
      return
    results = trainer.train_and_evaluate(config, FLAGS.workdir)
  except (FileNotFoundError, ValueError) as error:
    # Bad input (config, dataset folder, weights, checkpoint): one clear message. LAGA_DEBUG=1 re-raises.
    if os.environ.get("LAGA_DEBUG"):
      raise
    sys.exit(f"error: {error}\n(set LAGA_DEBUG=1 for the traceback)")
  if "rank1" in results:
    line = f"rank-1 {100 * results['rank1']:.2f}%  mAP {100 * results['mAP']:.2f}%"
    if "untrained" in results:
      u = results["untrained"]
      line += f"   (untrained: rank-1 {100 * u['rank1']:.2f}%  mAP {100 * u['mAP']:.2f}%)"
    print(line)
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
