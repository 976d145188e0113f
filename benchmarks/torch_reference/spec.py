"""The trajectory both frameworks run, and how two runs are compared. NumPy only: imported by the PyTorch side,
the JAX side and the test alike.

A tiny LAGA-Net (one Bottleneck per stage, base width 16, 128x64 images, 8 identities) trains for 24 steps on
P x K = 4 x 2 batches of seeded random images, with dropout 0 and the paper's loss and optimiser. Epochs are
compressed to 2 steps, so the per-epoch schedule crosses the end of the warm-up (epoch 4, step 8) and both
decay boundaries (epochs 8 and 11: steps 16 and 22). Initial weights are `tests/reference_weights.py`'s
synthetic state dict over the PyTorch reference's state-dict keys (attention gammas non-zero, so CAM and
SAM-RPE act from the first step).
"""

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import zlib
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "laga_trajectory.npz"
BOT_FIXTURE = ROOT / "tests" / "fixtures" / "bot_trajectory.npz"

# Tolerances of the issue: relative to the torch values.
LOSS_RTOL = 1e-4
PARAM_RTOL = 1e-3
STATS_RTOL = 1e-3
FEATURE_RTOL = 1e-3
# Stricter than the issue asks: the updates (final - initial) of every parameter tensor. Catches an optimiser
# difference (bias correction, eps, decay coupling) that the final values, dominated by the initial ones,
# would dilute below PARAM_RTOL. Measured worst: 1.5e-2 (LAGA-Net, the stem BN bias), 6.2e-3 (BoT).
UPDATE_RTOL = 5e-2

# Parameters with more elements than this are stored in the fixture as a count sketch of their update.
FULL_STORAGE_MAX = 8192
SKETCH_BUCKETS = 1024


@dataclasses.dataclass(frozen=True)
class _JsonFields:
  """What every parity run shares (a tiny network, seeded P x K batches, compressed epochs); round-trips
  through the fixture's JSON metadata."""

  stage_sizes: Tuple[int, ...] = (1, 1, 1, 1)
  width: int = 16
  last_stride: int = 1
  image: Tuple[int, int] = (128, 64)
  num_classes: int = 8
  p: int = 4
  k: int = 2
  steps: int = 24
  steps_per_epoch: int = 2
  eval_images: int = 8
  seed: int = 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str):
    fields = json.loads(text)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


@dataclasses.dataclass(frozen=True)
class Spec(_JsonFields):
  """Sizes and hyper-parameters of the LAGA-Net parity run (the paper's loss and optimiser, a tiny network)."""

  num_stripes: int = 3
  reduction_dim: int = 64
  leaky_slope: float = 0.1
  dropout: float = 0.0
  # Loss (eq. 8): sum over heads of LS-CE + beta * sum over heads of batch-hard triplet on the embedding.
  label_smoothing: float = 0.1
  triplet_beta: float = 0.1
  triplet_margin: float = 1.2
  # Optimiser: torch.optim.Adam(weight_decay=...) (coupled L2), backbone group at 0.1x, per-epoch schedule.
  # The paper's schedule shape (warm-up from lr / 100, x0.5 decays) at a quarter of its peak rate: with 8e-4,
  # float32 rounding alone (torch float32 against float64) moves the final BN statistics of this chaotic
  # 24-step run by ~1e-3, the tolerance; with 2e-4 by ~5e-5, so the comparison has room for the rounding
  # differences between frameworks and machines.
  lr: float = 2e-4
  warmup_start_lr: float = 2e-6
  warmup_epochs: int = 4
  decay_epochs: Tuple[int, ...] = (8, 11)
  decay_factor: float = 0.5
  backbone_lr_mult: float = 0.1
  weight_decay: float = 5e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class BoTSpec(_JsonFields):
  """The BoT parity run: its reference code's recipe (configs/softmax_triplet_with_center.yml) on a tiny
  network, the schedule compressed like LAGA-Net's.

  LS-CE (0.1) on the BNNeck's logits + batch-hard triplet (margin 0.3) on the GAP feature + 5e-4 x center loss
  (its centers by SGD at lr 0.5 on the unweighted loss); Adam at lr 3.5e-4 on every parameter with coupled L2
  5e-4; WarmupMultiStepLR(warmup_factor 0.01) stepped at every epoch start. As for LAGA-Net, the rate is a
  quarter of the reference's 3.5e-4: this untrained network learns from scratch, and at the full rate rounding
  alone grows to ~1e-3 over the 24 steps (measured: loss 1.0e-3, features 3.7e-3 at 3.5e-4; 5.5e-5 and 1.4e-4
  at 8.75e-5; the errors fall with the rate, as rounding amplified by training does). Compressed: warm-up over 4
  scheduler epochs, decays at scheduler epochs 8 and 11 (x0.1), 2 steps per epoch, so the 24 steps cross the
  end of the warm-up (epoch 3, step 6) and both decays (epochs 7 and 10: steps 14 and 20).
  """

  label_smoothing: float = 0.1
  triplet_margin: float = 0.3
  center_weight: float = 5e-4
  center_lr: float = 0.5
  lr: float = 8.75e-5
  warmup_factor: float = 0.01
  warmup_iters: int = 4
  milestones: Tuple[int, ...] = (8, 11)
  gamma: float = 0.1
  weight_decay: float = 5e-4
  model: str = "bot"


SPECS = {"laga": Spec, "bot": BoTSpec}
# BoT's center-loss centers in a torch run's state dicts (they belong to the loss, not to the model).
CENTERS_KEY = "center_loss.centers"
# Parameters a reference freezes at their zero initialisation (BoT's BNNeck shift): zero in the synthetic
# initial weights, and without a JAX counterpart.
ZEROED_KEYS = {"laga": (), "bot": ("bottleneck.bias",)}
# Per-step series of a run (BoT's has the center loss too) and what else a run stores besides state dicts.
SERIES = ("loss", "ce", "triplet", "center", "lr")
FIXTURES = {"laga": FIXTURE, "bot": BOT_FIXTURE}


def bot_lr_factor(t: int, spec: BoTSpec) -> float:
  """The reference's WarmupMultiStepLR (linear warm-up) at scheduler epoch `t`, as a factor of the base lr."""
  warmup = 1.0
  if t < spec.warmup_iters:
    alpha = t / spec.warmup_iters
    warmup = spec.warmup_factor * (1 - alpha) + alpha
  return warmup * spec.gamma ** sum(t >= m for m in spec.milestones)


def bot_learning_rate(epoch: int, spec: BoTSpec) -> float:
  """BoT's lr during 0-based `epoch`: the scheduler is stepped at every epoch start, after its constructor's
  step, so epoch e runs at scheduler epoch e + 1."""
  return spec.lr * bot_lr_factor(epoch + 1, spec)


def learning_rate(epoch: int, spec: Spec) -> float:
  """LR of the new layers at 0-based `epoch` (the backbone's is `backbone_lr_mult` times it)."""
  if epoch < spec.warmup_epochs:
    return spec.warmup_start_lr + (spec.lr - spec.warmup_start_lr) * epoch / spec.warmup_epochs
  return spec.lr * spec.decay_factor ** sum(epoch >= e for e in spec.decay_epochs)


def batches(spec: Spec) -> list:
  """`spec.steps` P x K batches: {"image": (P K, H, W, 3) float32 NHWC, "label": (P K,) int32}."""
  rng = np.random.default_rng([spec.seed, 1])
  out = []
  for _ in range(spec.steps):
    ids = rng.permutation(spec.num_classes)[:spec.p]
    images = rng.standard_normal((spec.p * spec.k,) + tuple(spec.image) + (3,)).astype(np.float32)
    out.append({"image": images, "label": np.repeat(ids, spec.k).astype(np.int32)})
  return out


def eval_images(spec: Spec) -> np.ndarray:
  """(eval_images, H, W, 3) float32 NHWC images for the final models' features."""
  rng = np.random.default_rng([spec.seed, 2])
  return rng.standard_normal((spec.eval_images,) + tuple(spec.image) + (3,)).astype(np.float32)


def _reference_weights():
  # tests/ is not a package; load the module by path so no other `tests` package can shadow it.
  path = ROOT / "tests" / "reference_weights.py"
  module_spec = importlib.util.spec_from_file_location("laga_reference_weights", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def initial_state_dict(shapes: Mapping[str, Sequence[int]], seed: int,
                       zeroed: Sequence[str] = ()) -> Dict[str, np.ndarray]:
  """The synthetic initial weights for a state dict with these keys and shapes (deterministic, keyed by name);
  the `zeroed` keys at zero (parameters a reference freezes at their zero initialisation)."""
  state = _reference_weights().synthetic_state_dict(shapes, seed)
  for key in zeroed:
    state[key] = np.zeros_like(state[key])
  return state


def digest(arrays: Sequence[np.ndarray]) -> str:
  """sha256 of the arrays' bytes: proves two runs regenerated the same batches or weights."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def batches_digest(spec: Spec) -> str:
  data = batches(spec)
  return digest([b[k] for b in data for k in ("image", "label")] + [eval_images(spec)])


def sketch(name: str, update: np.ndarray) -> np.ndarray:
  """Count sketch of a tensor (SKETCH_BUCKETS signed bucket sums, float64), seeded by the tensor's name.

  Linear, and it preserves norms in expectation: ||sketch(a) - sketch(b)|| estimates ||a - b|| whether the
  difference is spread over the tensor or sits in a few elements (those land whole in their buckets).
  """
  flat = np.asarray(update, np.float64).ravel()
  rng = np.random.default_rng([7, zlib.crc32(name.encode())])
  buckets = rng.integers(0, SKETCH_BUCKETS, flat.size)
  signs = rng.integers(0, 2, flat.size) * 2.0 - 1.0
  return np.bincount(buckets, weights=signs * flat, minlength=SKETCH_BUCKETS)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
  """||actual - expected|| / ||expected|| (float64; 0 when both are 0)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  denom = np.linalg.norm(expected)
  diff = np.linalg.norm(actual - expected)
  return float(diff / denom) if denom > 0 else float(diff)


# --- one run's results, in the JAX variable layout -----------------------------------------------------------
# A result is {"loss", "ce", "triplet": (steps,), "features": (eval_images, D),
#              "initial": {path: array}, "final": {path: array}} with paths "params/..." and "batch_stats/...".


def compare(jax_run: Mapping, torch_run: Mapping) -> dict:
  """Relative errors of a JAX run against a torch run (full, or loaded from the fixture).

  `torch_run["final"]` may hold full tensors or, for parameters loaded from the fixture, a dict
  {"sketch": ..., "norm": ...}: then the error is estimated from the sketches of the updates
  (final - initial; both runs start from the same initial values, `jax_run["initial"]`).
  """
  report = {"loss": [rel_err(a, b) for a, b in zip(jax_run["loss"], torch_run["loss"])],
            "features": rel_err(jax_run["features"], torch_run["features"]), "params": {}, "batch_stats": {},
            "params_update": {}}
  missing = sorted(set(torch_run["final"]) ^ set(jax_run["final"]))
  if missing:
    raise KeyError(f"the runs' final variables differ in names: {missing[:8]}")
  for path, expected in torch_run["final"].items():
    collection = path.split("/", 1)[0]
    actual = np.asarray(jax_run["final"][path])
    if isinstance(expected, Mapping):
      update = actual.astype(np.float64) - np.asarray(jax_run["initial"][path], np.float64)
      diff = np.linalg.norm(sketch(path, update) - expected["sketch"])
      report[collection][path] = float(diff / expected["norm"])
      report["params_update"][path] = float(diff / max(np.linalg.norm(expected["sketch"]), 1e-30))
    else:
      if actual.shape != expected.shape:
        raise ValueError(f"{path}: JAX shape {actual.shape}, torch shape {expected.shape}")
      report[collection][path] = rel_err(actual, expected)
      if collection == "params":
        initial = np.asarray(jax_run["initial"][path], np.float64)
        report["params_update"][path] = rel_err(actual - initial, np.asarray(expected, np.float64) - initial)
  return report


def worst(errors: Mapping[str, float]) -> Tuple[str, float]:
  name = max(errors, key=errors.get)
  return name, errors[name]


def summarise(report: Mapping) -> Tuple[bool, str]:
  """(passed, printable summary) against the tolerances above."""
  loss_step = int(np.argmax(report["loss"]))
  checks = [("per-step loss", f"step {loss_step}", report["loss"][loss_step], LOSS_RTOL),
            ("final params", *worst(report["params"]), PARAM_RTOL),
            ("final BN running stats", *worst(report["batch_stats"]), STATS_RTOL),
            ("final eval features (flip-averaged)", "all", report["features"], FEATURE_RTOL)]
  lines, passed = [], True
  for what, where, value, tol in checks:
    ok = value <= tol
    passed &= ok
    lines.append(f"{'ok  ' if ok else 'FAIL'} {what}: worst relative error {value:.2e} ({where}; tolerance {tol:.0e})")
  if report["params_update"]:
    name, value = worst(report["params_update"])
    ok = value <= UPDATE_RTOL
    passed &= ok
    lines.append(f"{'ok  ' if ok else 'FAIL'} parameter updates (final - initial): worst relative error "
                 f"{value:.2e} ({name}; tolerance {UPDATE_RTOL:.0e})")
  top = sorted(report["params"].items(), key=lambda kv: -kv[1])[:5]
  lines.append("     largest parameter errors: " + ", ".join(f"{n} {v:.1e}" for n, v in top))
  top = sorted(report["batch_stats"].items(), key=lambda kv: -kv[1])[:3]
  lines.append("     largest BN-statistic errors: " + ", ".join(f"{n} {v:.1e}" for n, v in top))
  return passed, "\n".join(lines)


# --- a whole torch run on disk (to compare it from an environment without torch) -------------------------

def save_run(path: pathlib.Path, run: Mapping) -> None:
  """A torch run as .npz (state dicts keyed `initial/<key>`, `final/<key>`)."""
  arrays = {k: np.asarray(run[k]) for k in SERIES + ("features",) if k in run}
  for which in ("initial", "final"):
    arrays.update({f"{which}/{k}": v for k, v in run[which].items()})
  arrays["info"] = np.asarray(run["info"])
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)


def load_run(path: pathlib.Path) -> dict:
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  run = {k: arrays.pop(k) for k in SERIES + ("features",) if k in arrays}
  run["info"] = str(arrays.pop("info"))
  for which in ("initial", "final"):
    prefix = which + "/"
    run[which] = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  return run


# --- the fixture ---------------------------------------------------------------------------------------------

def write_fixture(path: pathlib.Path, spec: Spec, torch_run: Mapping, meta: Mapping) -> None:
  """Store a torch run compactly: losses, features, BN statistics and small parameters in full, larger
  parameters as the count sketch of their update plus their final norm. The initial weights are not stored:
  they are regenerated from `meta["state_dict_shapes"]` and checked against `meta["initial_digest"]`."""
  arrays = {k: np.asarray(torch_run[k], np.float64) for k in SERIES if k in torch_run}
  arrays["features"] = np.asarray(torch_run["features"], np.float32)
  for name, value in torch_run["final"].items():
    value = np.asarray(value, np.float32)
    if name.startswith("params/") and value.size > FULL_STORAGE_MAX:
      update = value.astype(np.float64) - np.asarray(torch_run["initial"][name], np.float64)
      arrays[f"sketch/{name}"] = sketch(name, update).astype(np.float32)
      arrays[f"norm/{name}"] = np.asarray(np.linalg.norm(value.astype(np.float64)))
    else:
      arrays[f"final/{name}"] = value
  arrays["meta"] = np.asarray(json.dumps({"spec": json.loads(spec.to_json()), **meta}, sort_keys=True))
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)


def read_fixture(path: pathlib.Path = FIXTURE) -> Tuple[object, dict, dict]:
  """(spec, torch run in the `compare` layout, meta) of a fixture written by `write_fixture`."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  meta = json.loads(str(arrays.pop("meta")))
  fields = meta.pop("spec")
  spec = SPECS[fields.get("model", "laga")].from_json(json.dumps(fields))
  final: Dict[str, object] = {}
  for key, value in arrays.items():
    kind, _, name = key.partition("/")
    if kind == "final":
      final[name] = value
    elif kind == "sketch":
      final[name] = {"sketch": value.astype(np.float64), "norm": float(arrays[f"norm/{name}"])}
  run = {k: arrays[k] for k in SERIES + ("features",) if k in arrays}
  run["final"] = final
  return spec, run, meta


def state_dict_shapes(meta: Mapping) -> Dict[str, Tuple[int, ...]]:
  return {k: tuple(v) for k, v in meta["state_dict_shapes"]}


def fixture_initial_state_dict(spec, meta: Mapping) -> Dict[str, np.ndarray]:
  """The fixture run's initial weights, regenerated from the stored keys and shapes."""
  return initial_state_dict(state_dict_shapes(meta), spec.seed, meta.get("zeroed_keys", ()))


def check_regenerated(spec: Spec, meta: Mapping, initial_sd: Optional[Mapping[str, np.ndarray]] = None) -> None:
  """Raise if this NumPy regenerates different batches or initial weights than the fixture's run saw."""
  if batches_digest(spec) != meta["batches_digest"]:
    raise AssertionError("the seeded batches differ from the fixture's (NumPy's random streams changed?)")
  if initial_sd is not None and digest(list(initial_sd.values())) != meta["initial_digest"]:
    raise AssertionError("the synthetic initial weights differ from the fixture's (tests/reference_weights.py "
                         "or NumPy's random streams changed?)")
