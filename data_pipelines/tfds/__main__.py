"""Prepare `laga_reid` TFRecords (the `tfds build` CLI needs apache-beam; this does not).

  python -m data_pipelines.tfds --config market1501 --manual_dir /data --data_dir ~/tensorflow_datasets
  python -m data_pipelines.tfds --config '11k_*' --manual_dir /data --data_dir gs://bucket/tfds
"""

import argparse
import os
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only writes records here; keep it quiet.

from data_pipelines.tfds import laga_reid  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", required=True,
                      help="config name or shell pattern, repeatable (e.g. market1501, '11k_dorsal_right*')")
  parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"),
                      help="where the TFRecords go (any tf.io filesystem)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding the extracted downloads (default: <data_dir>/downloads/manual)")
  args = parser.parse_args(argv)
  try:
    names = laga_reid.matching_configs(args.config)
  except ValueError as error:
    parser.error(str(error))
  for name in names:
    builder = laga_reid.prepare(name, args.data_dir, args.manual_dir)
    splits = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f"laga_reid/{name}: {splits}  ->  {builder.data_path}")


if __name__ == "__main__":
  main()
