"""Every field of configs/base.py with a bad value fails at start-up, naming the field (no run starts)."""

import ml_collections
import pytest

from configs import base, demo_hands
from laga_jax import config_utils

# Fields where no value of the field's type is wrong (switches), or that another stage checks with its own
# clear message at start-up (the dataset folder: the parser names the missing path and shows the layout).
EXEMPT = {
    "data.root": "checked by the dataset parser, which names the missing folder and the expected layout",
}
# A bad value of the field's type where the generic one (-7, -1.0, "no-such-value", ()) does not apply.
BAD = {
    "data.image_size": (0, 64),
    "data.resize_size": (8, 8),
    "data.color_jitter": (0.1, 0.1, 0.1, 0.9),
    "train.steps_per_epoch": 0,
    "train.max_steps": 0,
    "train.num_devices": 0,
    "train.checkpoint_every_epochs": 0,
    "model.stage_sizes": (0, 1, 1, 1),
    "optim.decay_epochs": (60, 40),
}
# More bad values per field: the edges of each range.
EDGES = [
    ("train.checkpoint_every_epochs", -1), ("train.seed", 2 ** 31), ("train.num_epochs", 0),
    ("train.keep_checkpoints", 0), ("train.log_every_steps", 0), ("data.p", 0), ("data.k", 0),
    ("data.erasing_p", 1.5), ("data.num_parallel_calls", 0), ("data.color_jitter", (0.1, 0.1, 0.1)),
    ("data.color_jitter", (-0.1, 0.1, 0.1, 0.0)), ("data.bad_images", "ignore"),
    ("data.source", "tfrecord"), ("eval.rerank_lambda", 1.5),
    ("eval.figure_topk", 0), ("eval.batch_size", 0), ("eval.num_draws", 0), ("eval.rerank_k1", 0),
    ("optim.min_lr", 1.0), ("optim.momentum", 1.0), ("loss.center.lr", 0.0), ("model.leaky_slope", -0.1),
    ("mode", "evaluate"), ("eval.datasets", "market1501,market1501"), ("eval.datasets", "demo,dukemtmc=/x,mars"),
]
# Fields read only when another field switches them on: walked with that switch on.
CONTEXT = {
    "loss.center.feature": {"loss.center.weight": 5e-4},
}


def _leaves(node: ml_collections.ConfigDict, prefix: str = ""):
  for key, value in node.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      if name == "data.options":  # the dataset's own options: tested below
        continue
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def _generic_bad(value):
  if isinstance(value, bool):
    return None  # every bool is a valid switch
  if isinstance(value, int):
    return -7
  if isinstance(value, float):
    return -1.0
  if isinstance(value, str):
    return "no-such-value"
  if isinstance(value, (tuple, list)):
    return ()
  raise TypeError(f"no generic bad value for {value!r}")


def _set(config, field, value):
  *parents, name = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[name] = value


def _cases():
  cases = []
  for field, value in _leaves(base.get_config()):
    if field in EXEMPT:
      continue
    bad = BAD.get(field, _generic_bad(value))
    if bad is not None:
      cases.append(pytest.param(field, bad, id=field))
  return cases + [pytest.param(field, bad, id=f"{field}={bad!r}") for field, bad in EDGES]


def test_every_field_is_walked():
  """The walk covers every field of base.py: a new field needs a check (or an EXEMPT entry saying why)."""
  walked = {c.values[0] for c in _cases()}
  for field, value in _leaves(base.get_config()):
    assert field in walked or field in EXEMPT or isinstance(value, bool), field
  assert set(EXEMPT) | set(BAD) | set(CONTEXT) <= {f for f, _ in _leaves(base.get_config())}


@pytest.mark.parametrize("field, bad", _cases())
def test_bad_value_is_refused_naming_the_field(field, bad):
  config = base.get_config()
  for switch, value in CONTEXT.get(field, {}).items():
    _set(config, switch, value)
  config_utils.validate_config(config)  # the defaults (with the field's switch on) are valid
  _set(config, field, bad)
  with pytest.raises(config_utils.ConfigError) as info:
    config_utils.validate_config(config)
  message = str(info.value)
  assert message.startswith(f"--config.{field}=") and "\n" not in message, message


def test_unknown_dataset_option_is_named():
  config = demo_hands.get_config()
  config.data.options.aspekt = "palmar left"
  with pytest.raises(config_utils.ConfigError, match=r"--config.data.options.aspekt='palmar left': expected an "
                                                     r"option of dataset 'demo_hands': aspect, combined_gallery"):
    config_utils.validate_config(config)


def test_demo_hands_config_is_valid():
  config = demo_hands.get_config()
  config_utils.validate_config(config)
  assert config.data.kind == "hand" and config.train.select_best and config.eval.num_draws == 10
