"""A run's saved `config.json` as a config file, so a run's exact settings can be passed back.

  python run.py --config configs/from_json.py:runs/demo/config.json --workdir runs/demo --mode eval

`run.py` also accepts the JSON file itself: `--config runs/demo/config.json`. Overrides on the command line
(`--config.<section>.<field>=value`) apply on top, as with any config file.
"""

from laga_jax import saved_config


def get_config(path: str = ""):
  if not path:
    raise ValueError("configs/from_json.py needs the JSON file: --config configs/from_json.py:<workdir>/config.json")
  return saved_config.load(path)
