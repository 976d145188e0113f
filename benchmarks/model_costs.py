"""Parameters, eval feature size and GFLOPs per image of every registered model, on its Market-1501 config.

  python -m benchmarks.model_costs --out benchmarks/results/model_costs.json

GFLOPs come from XLA's cost analysis of the compiled eval forward pass (one image, no flip): at 384×128 for
every model, so the column compares like with like, and at the config's own image size where it differs (BoT
trains and tests at 256×128). Parameters count the network only (loss parameters such as BoT's centers are not
in the model). Nothing is run: parameters stay abstract (`jax.eval_shape`), so this takes a few compiles, not
a training.
"""

import argparse
import json
import pathlib
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from laga_jax import compare, models  # noqa: E402

MARKET_CLASSES = 751
COMMON_SIZE = (384, 128)   # the body image size of the paper and of every rival but BoT
# model -> its Market-1501 config (the paper's model first).
CONFIGS = {"laga": "configs/market.py", "bot": "configs/bot.py:market1501", "pcb": "configs/pcb.py:market1501",
           "pcb_rpp": "configs/pcb.py:market1501_rpp", "mgn": "configs/mgn.py:market1501",
           "mba": "configs/mba.py:market1501"}


def feature_dim(config) -> int:
  module = models.get_model(config.model.name)
  model = module.build(config.model, MARKET_CLASSES)
  image = jnp.zeros((1,) + tuple(config.data.image_size) + (3,), jnp.float32)

  def forward(rng):
    variables = model.init(rng, image, train=False)
    return module.eval_features(model.apply(variables, image, train=False))

  return int(jax.eval_shape(forward, jax.random.PRNGKey(0)).shape[-1])


def main(argv: Optional[list] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(CONFIGS), help="comma-separated keys of CONFIGS")
  parser.add_argument("--out", default=None, help="JSON file for the table")
  args = parser.parse_args(argv)
  rows = []
  for key in args.models.split(","):
    if key not in CONFIGS:
      raise SystemExit(f"--models: unknown {key!r}; expected some of {', '.join(CONFIGS)}")
    config = compare.load_config(str(ROOT / CONFIGS[key]))
    cost = compare.model_cost(config, MARKET_CLASSES)
    row = {"model": key, "config": CONFIGS[key], "image_size": list(config.data.image_size),
           "feature_dim": feature_dim(config), "params": cost["params"], "gflops": cost["gflops"]}
    if tuple(config.data.image_size) == COMMON_SIZE:
      row["gflops_384x128"] = cost["gflops"]
    else:
      common = config.copy_and_resolve_references()
      common.data.image_size = COMMON_SIZE
      row["gflops_384x128"] = compare.model_cost(common, MARKET_CLASSES)["gflops"]
    rows.append(row)
    print(f"{key:8s} {row['config']:30s} {'x'.join(map(str, row['image_size'])):8s} "
          f"dim {row['feature_dim']:6d}  params {row['params'] / 1e6:6.2f} M  {row['gflops']:6.2f} GFLOPs "
          f"({row['gflops_384x128']:.2f} at 384x128)", flush=True)
  print("\n| model | config | image | feature dim | params (M) | GFLOPs / image at 384×128 | at its own size |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['model']} | `{row['config']}` | {'×'.join(map(str, row['image_size']))} | {row['feature_dim']} | "
          f"{row['params'] / 1e6:.2f} | {row['gflops_384x128']:.2f} | {row['gflops']:.2f} |")
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"jax": jax.__version__, "classes": MARKET_CLASSES,
                                                  "common_image_size": list(COMMON_SIZE), "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
