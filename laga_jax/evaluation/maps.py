"""Where a model looks: activation maps of every model, LAGA-Net's SAM-RPE and CAM attention, as image grids.

* Activation maps (torchreid's `visactmap`, Zhou et al. 2019): the channel-wise L2 norm of the last
  convolutional feature maps, here the output of every final ResNet stage (one per branch: LAGA-Net's four
  layer4 copies, MGN's three, BoT's and PCB's one).
* SAM-RPE spatial attention (paper eq. 3): the softmax row of one query position (the centre of the map by
  default) and the mean over all query positions (how much each position is attended to).
* CAM channel attention (eq. 1): the channels' mean attention weight applied to the CAM output, |sum_c w_c y_c|.

Every map is upsampled bilinearly to the image and drawn over it; a grid has one row per image and one
column per map, the input first.
"""

import pathlib
from typing import Dict, List, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from laga_jax.models.attention import CAM, SAMRPE
from laga_jax.models.resnet import ResNetStage

_HEADER = 16   # pixels of column titles


def _captured(module, method_name: str) -> bool:
  return method_name == "__call__" and isinstance(module, (ResNetStage, CAM, SAMRPE))


def compute_maps(model, variables: dict, images: jax.Array, *, query_position: Optional[Sequence[int]] = None
                 ) -> Dict[str, np.ndarray]:
  """{name: (B, h, w) float32 map} for NHWC float32 `images` (normalised as for evaluation).

  Names: "act:<stage path>" for each final ResNet stage, "sam:<module>@query" / "sam:<module>@mean" for
  SAM-RPE modules, "cam:<module>" for CAM modules. `query_position` (row, col) of the SAM query, on the
  attention module's own map; default its centre.
  """
  _, state = model.apply(variables, images, train=False, capture_intermediates=_captured,
                         mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
  stage_outputs, attention, cam_outputs = {}, {}, {}
  for path, value in flat.items():
    name = "/".join(str(p) for p in path[:-1])
    value = value[0] if isinstance(value, tuple) else value
    if path[-1] == "__call__":
      if value.ndim == 4 and isinstance(value, jax.Array):
        stage_outputs[name] = value
    elif path[-1] == "attention":
      attention[name] = value
  maps: Dict[str, np.ndarray] = {}
  # Final stages: the stage outputs with the most channels (layer4 copies), not attention outputs.
  stages = {n: v for n, v in stage_outputs.items() if n not in attention}
  widest = max((v.shape[-1] for v in stages.values()), default=0)
  for name, value in stages.items():
    if value.shape[-1] == widest:
      maps[f"act:{name}"] = np.asarray(jnp.linalg.norm(value.astype(jnp.float32), axis=-1))
  for name, att in attention.items():
    out = stage_outputs.get(name)
    if out is None:
      continue
    b, h, w, c = out.shape
    if att.shape[-1] == h * w:          # SAM-RPE: (B, P, P) over positions
      row, col = query_position if query_position is not None else (h // 2, w // 2)
      index = min(max(int(row), 0), h - 1) * w + min(max(int(col), 0), w - 1)
      maps[f"sam:{name}@query"] = np.asarray(att[:, index, :].reshape(b, h, w), np.float32)
      maps[f"sam:{name}@mean"] = np.asarray(att.mean(axis=1).reshape(b, h, w), np.float32)
    elif att.shape[-1] == c:            # CAM: (B, C, C) over channels
      weights = att.mean(axis=1)        # how much each channel is attended to
      maps[f"cam:{name}"] = np.asarray(jnp.abs(jnp.einsum("bhwc,bc->bhw", out.astype(jnp.float32), weights)))
  return maps


def _colour(heat: np.ndarray) -> np.ndarray:
  """(H, W) in [0, 1] -> (H, W, 3) uint8 through matplotlib's 'jet' (torchreid's choice for these maps)."""
  from matplotlib import colormaps  # Deferred: only pictures need it.
  return (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """`heat` (h, w), min-max normalised and bilinearly upsampled, blended over uint8 `image` (H, W, 3)."""
  height, width = image.shape[:2]
  heat = np.asarray(heat, np.float32)
  heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
  up = np.asarray(Image.fromarray(heat).resize((width, height), Image.BILINEAR))
  return (alpha * image + (1 - alpha) * _colour(np.clip(up, 0, 1))).astype(np.uint8)


def short_name(name: str) -> str:
  """Column title: "act layer4_global", "sam sam4 @query", ... (the last module names only)."""
  kind, _, path = name.partition(":")
  parts = path.split("/")
  module = parts[-1] if parts[-1] not in ("layer4",) or len(parts) == 1 else "/".join(parts[-2:])
  return f"{kind} {module}".replace("@", " @")


def save_grid(path: str, images: np.ndarray, maps: Dict[str, np.ndarray], *, cell_height: int = 192,
              names: Optional[List[str]] = None) -> str:
  """Write a PNG grid: one row per uint8 image (N, H, W, 3), the input then one overlay per map."""
  images = np.asarray(images)
  names = list(maps) if names is None else names
  n, height, width = images.shape[:3]
  scale = cell_height / height
  cell = (int(round(width * scale)), cell_height)
  # Wide enough for its title: a column is at least 7 px per character of the longest title.
  col_w = max(cell[0], 7 * max(len(short_name(k)) for k in names) if names else cell[0])
  grid = Image.new("RGB", ((1 + len(names)) * (col_w + 4), _HEADER + n * (cell[1] + 4)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  titles = ["input"] + [short_name(k) for k in names]
  for j, title in enumerate(titles):
    draw.text((j * (col_w + 4) + 2, 2), title, fill=(0, 0, 0))
  for i in range(n):
    tiles = [images[i]] + [overlay(images[i], maps[k][i]) for k in names]
    for j, tile in enumerate(tiles):
      x = j * (col_w + 4) + (col_w - cell[0]) // 2
      grid.paste(Image.fromarray(tile).resize(cell, Image.BILINEAR), (x, _HEADER + i * (cell[1] + 4)))
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)
  return path


def grid_for_records(model, variables: dict, records: Sequence, data_cfg, path: str, *,
                     num_images: int = 6, seed: int = 0) -> str:
  """Maps of `num_images` seeded records (eval preprocessing), saved as a grid PNG at `path`."""
  from data_pipelines import input_pipeline
  rng = np.random.default_rng(seed)
  chosen = [records[i] for i in np.sort(rng.choice(len(records), min(num_images, len(records)), replace=False))]
  batch = next(input_pipeline.eval_batches(chosen, data_cfg, len(chosen)).as_numpy_iterator())
  maps = compute_maps(model, variables, jnp.asarray(batch["image"]))
  height, width = data_cfg.image_size
  raw = np.stack([np.asarray(Image.open(r.path).convert("RGB").resize((width, height), Image.BILINEAR))
                  for r in chosen])
  return save_grid(path, raw, maps)
