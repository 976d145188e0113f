"""Trajectory parity: LAGA-Net and BoT trained step by step in PyTorch (this folder's references) and in laga-jax.

  python -m benchmarks.torch_reference.parity                       # both models, one process: torch + the project
  python -m benchmarks.torch_reference.parity --model bot           # one of them (laga, bot, all)
  python -m benchmarks.torch_reference.parity --write-fixture        # ... and rewrite the tests' fixtures
  python -m benchmarks.torch_reference.parity --model laga --torch-out run.npz   # torch side only (no jax)
  python -m benchmarks.torch_reference.parity --model laga --torch-run run.npz   # JAX against a saved torch run

Same initial weights (`tests/reference_weights.py`'s synthetic state dict, loaded into the torch model and
ported from its state dict), same batches, dropout 0 (spec.py has the sizes and the schedules). Prints the
worst relative errors of the per-step losses, the final parameters and BatchNorm running statistics (naming
the tensor) and the final models' eval features, and exits 1 when one exceeds its tolerance. Before training
it checks each reference itself: LAGA-Net's ResNet against torchvision's resnet50 at width 64 and its
CAM / SAM-RPE / ClassBlock / losses against tests/fixtures; BoT's network against the outputs of
reid-strong-baseline's own `Baseline` (tests/fixtures/bot_reference.npz).
"""

import argparse
import pathlib
import sys
import time
from typing import Optional

from benchmarks.torch_reference import spec as spec_lib


def _check(what: str, errors: dict, tol: float = 1e-5) -> None:
  name = max(errors, key=errors.get)
  print(f"{what} ({len(errors)} arrays): worst max-relative error {errors[name]:.1e} ({name})")
  if errors[name] > tol:
    raise SystemExit(f"the reference does not reproduce {what.split(' vs ')[-1]}")


def torch_side(spec, threads: int) -> dict:
  if isinstance(spec, spec_lib.BoTSpec):
    from benchmarks.torch_reference import bot
    # tests/test_bot.py's tolerance: train-mode BatchNorm over 6 images rounds differently per framework.
    _check("reference BoT network vs reid-strong-baseline's Baseline", bot.check_fixture(), tol=1e-4)
    train = bot.run
  else:
    from benchmarks.torch_reference import model as model_lib
    from benchmarks.torch_reference import training
    diff = model_lib.check_matches_torchvision()
    print(f"reference ResNet at width 64 vs torchvision resnet50 (same weights): max |logit difference| {diff:.1e}")
    if diff > 1e-5:
      raise SystemExit("the reference ResNet does not reproduce torchvision's resnet50")
    _check("reference CAM / SAM-RPE / ClassBlock / LS-CE / triplet vs tests/fixtures", training.check_module_fixtures())
    train = training.run
  start = time.perf_counter()
  run = train(spec, threads=threads)
  run["info"] = f"torch {run['torch']}, {threads} thread(s)"
  print(f"torch: {spec.steps} steps in {time.perf_counter() - start:.1f} s ({run['info']}); "
        f"loss {run['loss'][0]:.4f} -> {run['loss'][-1]:.4f}")
  return run


def jax_side_against(spec, torch_run: dict, verbose: bool) -> tuple:
  import jax
  from benchmarks.torch_reference import jax_side
  start = time.perf_counter()
  with jax.default_matmul_precision("highest"):
    training = jax_side.project_training(spec)
    jax_run = jax_side.run(spec, torch_run["initial"], training, log=print if verbose else lambda _: None)
  print(f"JAX {jax.__version__} ({jax.default_backend()}): {spec.steps} steps in "
        f"{time.perf_counter() - start:.1f} s incl. compiling; loss {jax_run['loss'][0]:.4f} -> "
        f"{jax_run['loss'][-1]:.4f}")
  torch_flat = jax_side.torch_run_in_jax_layout(torch_run, jax_run["template"], training.to_variables)
  initial_diff = max(spec_lib.rel_err(jax_run["initial"][k], v) for k, v in torch_flat["initial"].items())
  if initial_diff != 0:
    raise SystemExit(f"the JAX initial variables differ from torch's ({initial_diff:.1e}): the port is not exact")
  return jax_run, torch_flat


def parity(name: str, args) -> bool:
  """One model's parity run (torch side live or loaded, JAX side, comparison); True when it passes."""
  spec = spec_lib.SPECS[name](steps=args.steps or spec_lib.SPECS[name].steps)
  print(f"=== {name}: {spec.steps} steps, P x K = {spec.p} x {spec.k}, {spec.image[0]}x{spec.image[1]}, "
        f"width {spec.width}")
  if args.torch_run:
    torch_run = spec_lib.load_run(args.torch_run)
    print(f"torch run from {args.torch_run} ({torch_run['info']})")
  else:
    torch_run = torch_side(spec, args.threads)
  if args.torch_out:
    spec_lib.save_run(args.torch_out, torch_run)
    print(f"wrote {args.torch_out}")
    return True

  jax_run, torch_flat = jax_side_against(spec, torch_run, args.verbose)
  report = spec_lib.compare(jax_run, torch_flat)
  print("step  lr(new)    torch loss     JAX loss   rel err")
  for i, (lr, t, j, e) in enumerate(zip(torch_run["lr"], torch_run["loss"], jax_run["loss"], report["loss"])):
    print(f"{i:4d}  {lr:.2e}  {t:11.6f}  {j:11.6f}  {e:.1e}")
  passed, summary = spec_lib.summarise(report)
  print(summary)
  if args.write_fixture:
    path = spec_lib.FIXTURES[name] if args.write_fixture is True else args.write_fixture
    if not passed:
      print("not writing the fixture: the runs do not agree")
    else:
      shapes = [[k, list(v.shape)] for k, v in torch_run["initial"].items()]
      meta = {"state_dict_shapes": shapes, "initial_digest": spec_lib.digest(list(torch_run["initial"].values())),
              "batches_digest": spec_lib.batches_digest(spec), "torch": torch_run["info"],
              "zeroed_keys": list(spec_lib.ZEROED_KEYS[name])}
      spec_lib.write_fixture(path, spec, torch_flat, meta)
      print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
  print(f"{name}: {'PASS' if passed else 'FAIL'}")
  return passed


def main(argv: Optional[list] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=(*spec_lib.SPECS, "all"), default="all")
  parser.add_argument("--steps", type=int, default=0, help="optimiser steps (default: each model's 24)")
  parser.add_argument("--threads", type=int, default=1, help="torch threads")
  parser.add_argument("--torch-out", type=pathlib.Path, help="run the torch side only and save it here (.npz)")
  parser.add_argument("--torch-run", type=pathlib.Path, help="compare JAX against a torch run saved by --torch-out")
  parser.add_argument("--write-fixture", nargs="?", const=True, type=pathlib.Path,
                      help="also write the torch run as the test fixture (default: tests/fixtures/"
                           "<model>_trajectory.npz)")
  parser.add_argument("--verbose", action="store_true", help="print every JAX step's loss")
  args = parser.parse_args(argv)
  names = list(spec_lib.SPECS) if args.model == "all" else [args.model]
  if args.write_fixture and args.steps:
    parser.error("--write-fixture stores the default run (no --steps)")
  if len(names) > 1 and (args.torch_out or args.torch_run or isinstance(args.write_fixture, pathlib.Path)):
    parser.error("--torch-out, --torch-run and --write-fixture PATH take one model: add --model laga or bot")
  results = {name: parity(name, args) for name in names}
  print("  ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in results.items()))
  return 0 if all(results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
