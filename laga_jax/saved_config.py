"""A run's saved `config.json` read back into the `ConfigDict` it was written from.

Every run writes `<workdir>/config.json`. Evaluation, export, indexing and search on that workdir start from
it, so the training overrides never need retyping; command-line overrides are applied on top:

    python run.py --config runs/demo/config.json --workdir runs/demo --mode eval
    python run.py --config configs/from_json.py:runs/demo/config.json --workdir runs/demo --mode eval
"""

import json
import pathlib
from typing import Any, List, Mapping, Sequence, Union

import ml_collections

CONFIG_FILE = "config.json"
# `run.py` modes that use a trained workdir and so reload its saved config when it has one.
RELOADING_MODES = ("eval", "search", "index", "export")


def _restore(value: Any) -> Any:
  """JSON -> config values: objects become ConfigDicts, arrays tuples (the configs' own type for pairs,
  decay epochs and parameter groups), everything else unchanged."""
  if isinstance(value, Mapping):
    return ml_collections.ConfigDict({k: _restore(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_restore(v) for v in value)
  return value


def from_dict(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config from the parsed JSON of `ConfigDict.to_json_best_effort()`."""
  if not isinstance(data, Mapping) or "model" not in data or "data" not in data:
    raise ValueError("a saved run config needs at least the 'model' and 'data' sections")
  return _restore(data)


def load(path: Union[str, pathlib.Path]) -> ml_collections.ConfigDict:
  """The config saved as `path` (a config.json, or a workdir holding one)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no saved config (a run writes <workdir>/{CONFIG_FILE} when it starts)")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not a JSON config ({error})") from None
  try:
    return from_dict(data)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`config` with flat `{"section.field": value}` overrides set (as `--config.section.field=value` does)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"--config.{path}: the saved config has no section {part!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"--config.{path}: the saved config has no field {leaf!r}")
    with node.ignore_type():
      node[leaf] = value
  return config


def _from_json_config_file() -> str:
  import importlib.util
  spec = importlib.util.find_spec("configs")
  roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
  for root in roots:
    candidate = pathlib.Path(root) / "from_json.py"
    if candidate.is_file():
      return str(candidate)
  return str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "from_json.py")


def json_config_argv(argv: Sequence[str]) -> List[str]:
  """`argv` with `--config <file>.json` turned into `--config configs/from_json.py:<file>.json`, since
  ml_collections' config flag reads Python files only."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config=") and arg.endswith(".json"):
      out[i] = f"--config={_from_json_config_file()}:{arg[len('--config='):]}"
    elif arg == "--config" and i + 1 < len(out) and out[i + 1].endswith(".json"):
      out[i + 1] = f"{_from_json_config_file()}:{out[i + 1]}"
  return out


def for_workdir(config: ml_collections.ConfigDict, workdir: Union[str, pathlib.Path], mode: str,
                overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a `mode` run on `workdir` uses: for the modes that use a trained run (eval, search, index,
  export), the workdir's saved config with the command-line `overrides` on top; otherwise `config`."""
  saved = pathlib.Path(workdir) / CONFIG_FILE
  if mode not in RELOADING_MODES or not saved.is_file():
    return config
  import logging
  logging.getLogger("laga_jax").info("using the saved config %s (command-line overrides applied)", saved)
  reloaded = apply_overrides(load(saved), overrides)
  reloaded.mode = mode
  return reloaded
