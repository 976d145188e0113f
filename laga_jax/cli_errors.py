"""`run.py`'s failures as one clear line each, without a traceback (`LAGA_DEBUG=1` shows the traceback).

Two entry points: `parse_flags`, absl's flag parser with one-line errors for a bad command line (an unknown
`--config.<field>`, a value of the wrong type, a config file that fails to load), and `report`, which turns
an exception from the run into its line on stderr and the process exit code. Imports nothing heavy: flags are
parsed before JAX and TensorFlow are loaded.
"""

import difflib
import errno
import importlib.util
import os
import re
import sys
from typing import NoReturn, Optional, Sequence

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def debug() -> bool:
  return bool(os.environ.get("LAGA_DEBUG"))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _first_line_and_cause(text: str) -> str:
  """The first line of `text`, plus its last line when it embeds a traceback (a config file that raised)."""
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  if not lines:
    return ""
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    head = lines[0].rstrip(":").replace("Error whilst parsing config file", "the config file raised")
    return f"{head}: {lines[-1]}"
  return " ".join(lines)


def _config_override_args(argv: Sequence[str]) -> list:
  """(path, argument) of every `--config.<path>[=value]` on the command line."""
  out = []
  for arg in argv:
    match = re.match(r"--config\.([^=\s]+)", arg)
    if match:
      out.append((match.group(1), arg))
  return out


def _config_file(argv: Sequence[str]) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """The config `run.py` would load from `--config path[:args]` (None if it cannot be loaded)."""
  path, *args = spec.split(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_laga_config_probe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*args)
  except Exception:  # noqa: BLE001 - only used to phrase an error better; the flag error stands otherwise
    return None


def unknown_field_message(argv: Sequence[str], error: BaseException) -> str:
  """'--config.train.nonexistent=1: config.train has no field 'nonexistent' (did you mean ...?; fields: ...)'."""
  inner = error
  while inner.args and isinstance(inner.args[0], BaseException):  # AttributeError(KeyError("'name'"))
    inner = inner.args[0]
  raw = str(inner.args[0]) if inner.args else str(inner)
  key = raw.split("\n")[0].strip().strip("\"'")
  overrides = _config_override_args(argv)
  culprit = next(((path, arg) for path, arg in overrides if key in path.split(".")), None)
  if culprit is None:
    return f"unknown config field {key!r} on the command line"
  path, arg = culprit
  parts = path.split(".")
  parent_parts = parts[:parts.index(key)]
  parent = "config" + "".join(f".{p}" for p in parent_parts)
  fields = []
  spec = _config_file(argv)
  config = _load_config(spec) if spec else None
  if config is not None:
    node = config
    try:
      for part in parent_parts:
        node = node[part]
      fields = sorted(node.keys())
    except (KeyError, AttributeError, TypeError):
      fields = []
  hint = ""
  close = difflib.get_close_matches(key, fields, n=1)
  if close:
    hint = f"did you mean {close[0]!r}? "
  listing = f"({hint}fields: {', '.join(fields)})" if fields else "(see configs/base.py)"
  return f"{arg}: {parent} has no field {key!r} {listing}"


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing with one-line errors (for `app.run(main, flags_parser=parse_flags)`)."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    if debug():
      raise
    fail(_first_line_and_cause(str(error)))
  except (AttributeError, KeyError) as error:  # ml_collections: an override names no existing field
    if debug():
      raise
    fail(unknown_field_message(argv, error))


def describe(error: BaseException) -> tuple:
  """(one-line message, exit code) for an exception that ended the run."""
  from laga_jax import safeguards  # Light: no JAX at import.

  if isinstance(error, safeguards.TrainingPreempted):
    return str(error), safeguards.EXIT_PREEMPTED
  if isinstance(error, safeguards.TrainingInterrupted):
    return str(error), EXIT_INTERRUPTED
  if isinstance(error, KeyboardInterrupt):
    return ("interrupted (Ctrl-C) outside the training steps; nothing was lost: the same command resumes "
            "from the last checkpoint"), EXIT_INTERRUPTED
  ours = type(error).__module__.startswith(("laga_jax", "data_pipelines"))
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    if ours:  # checkpoint.DiskFullError: its own sentence
      return str(error.strerror or error), EXIT_ERROR
    where = f" writing {error.filename}" if error.filename else ""
    return f"no space left on device{where}; free some space and rerun the same command to resume", EXIT_ERROR
  if ours or (isinstance(error, (ValueError, OSError)) and type(error).__module__ == "builtins"
              and len(str(error)) < 2000):
    # Bad input (config, dataset folder, weights, checkpoint, images): the message is written for the user.
    return str(error), EXIT_ERROR
  first = _first_line_and_cause(str(error))[:500] or "(no message)"
  return (f"{type(error).__name__}: {first} (an unexpected error: LAGA_DEBUG=1 shows the traceback)",
          EXIT_ERROR)


def report(error: BaseException) -> NoReturn:
  """Print `error` as its line and exit with its code; with LAGA_DEBUG=1 re-raise it (full traceback)."""
  if debug():
    raise error
  message, code = describe(error)
  fail(message, code)
