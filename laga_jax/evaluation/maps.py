"""Where a model looks, drawn over its input images as grids (rows: images; columns: input, then one map each).

The maps come from the model's module through the registry (`laga_jax.models.maps_function`): every model's
activation maps (torchreid's `visactmap`: the channel-wise L2 norm of its final ResNet stages, one per
branch), and for the models with attention modules (LAGA-Net, MBA-Net) their SAM-RPE attention (paper eq. 3:
one query position's softmax row, and the mean over queries) and CAM attention (eq. 1). Every map is
upsampled bilinearly to the image and drawn over it.
"""

import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from laga_jax import models

_HEADER = 16   # pixels of column titles


def compute_maps(model, variables: dict, images: jax.Array, *, query_position: Optional[Sequence[int]] = None
                 ) -> Dict[str, np.ndarray]:
  """{name: (B, h, w) float32 map} of the built model `model` for NHWC float32 `images` (normalised as for
  evaluation), from its module's `maps` hook; `query_position` (row, col) of a spatial-attention query on
  the attention module's own map (default its centre)."""
  return models.maps_function(model)(model, variables, images, query_position=query_position)


def parse_position(value: Optional[Sequence]) -> Optional[Tuple[int, int]]:
  """`--query_position` ("row,col", or its two parts) as (row, col) integers; None stays None."""
  if value is None:
    return None
  parts = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
  if len(parts) != 2 or not all(p.lstrip("-").isdecimal() for p in parts):
    raise ValueError(f"--query_position={','.join(parts)}: expected row,col (two integers on the attention map)")
  return int(parts[0]), int(parts[1])


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


def titles(name: str) -> Tuple[str, str]:
  """Two title lines of a map column: what it shows, then where ("activation" / "layer4 global";
  "SAM-RPE sam3" / "query (4, 2)"; "CAM cam4" / "channel attention")."""
  kind, _, path = name.partition(":")
  path, _, detail = path.partition("@")
  if "#" in path:                                   # the k-th call of a module called once per branch
    path, call = path.split("#")
    path = f"{path} call {call}"
  parts = [q for q in path.replace("[", "/").replace("]", "").split("/") if q and q != "backbone"]
  where = " ".join(parts).replace("_", " ")
  if kind == "sam":
    if detail.startswith("query="):
      return f"SAM-RPE {where}", "query ({})".format(detail[len("query="):].replace(",", ", "))
    return f"SAM-RPE {where}", "mean over queries"
  if kind == "cam":
    return f"CAM {where}", "channel attention"
  return "activation", where


def _query_cell(name: str) -> Optional[Tuple[int, int]]:
  """(row, col) of a SAM-RPE query map's query position, from its name; None for other maps."""
  _, _, detail = name.partition("@query=")
  return tuple(int(v) for v in detail.split(",")) if detail else None


def _font(size: int):
  """DejaVu Sans (shipped with matplotlib) at `size` pixels; PIL's bitmap font where it is missing."""
  from PIL import ImageFont
  try:
    from matplotlib import font_manager  # Deferred: only pictures need it.
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
  except (ImportError, OSError, ValueError):
    return ImageFont.load_default()


def save_grid(path: str, images: np.ndarray, maps: Dict[str, np.ndarray], *, cell_height: int = 192,
              names: Optional[List[str]] = None) -> str:
  """Write a PNG grid: one row per uint8 image (N, H, W, 3), the input then one overlay per map.

  Two title lines per column (`titles`); a white ring marks the query position on SAM-RPE query maps; a
  colour bar under the grid says how to read the colours (each map is min-max scaled per image).
  """
  images = np.asarray(images)
  names = list(maps) if names is None else names
  n, height, width = images.shape[:3]
  scale = cell_height / height
  cell = (int(round(width * scale)), cell_height)
  font, small = _font(13), _font(11)
  heads = [("input", "")] + [titles(k) for k in names]
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_w = max(measure.textlength(t, font=font) for pair in heads for t in pair if t)
  col_w = max(cell[0], int(text_w) + 8)            # wide enough for its longest title
  header, gap, footer = 40, 6, 48
  note = "each map min-max scaled per image" + ("; ring: query position" if any(map(_query_cell, names)) else "")
  # At least as wide as the colour bar's note, so that a one-map grid (BoT, PCB) still reads.
  width_px = max((1 + len(names)) * (col_w + gap) + gap, int(measure.textlength(note, font=small)) + 2 * gap + 8)
  grid = Image.new("RGB", (width_px, header + n * (cell[1] + gap) + footer), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for j, (first, second) in enumerate(heads):
    centre = gap + j * (col_w + gap) + col_w / 2
    draw.text((centre, 4), first, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((centre, 21), second, fill=(70, 70, 70), font=font, anchor="ma")
  for i in range(n):
    tiles = [images[i]] + [overlay(images[i], maps[k][i]) for k in names]
    top = header + i * (cell[1] + gap)
    for j, tile in enumerate(tiles):
      left = gap + j * (col_w + gap) + (col_w - cell[0]) // 2
      grid.paste(Image.fromarray(tile).resize(cell, Image.BILINEAR), (left, top))
      query = _query_cell(names[j - 1]) if j else None
      if query is not None:
        h, w = maps[names[j - 1]].shape[1:]
        x, y = left + (query[1] + 0.5) * cell[0] / w, top + (query[0] + 0.5) * cell[1] / h
        radius = max(3, 0.4 * min(cell[0] / w, cell[1] / h))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(255, 255, 255), width=2)
  # Colour bar: the 'jet' ramp the overlays use, low to high, and how to read it below.
  bar_left, bar_top = gap + 34, grid.height - footer + 8
  bar_w = max(60, min(240, grid.width - bar_left - 40))
  ramp = _colour(np.tile(np.linspace(0.0, 1.0, bar_w, dtype=np.float32), (12, 1)))
  grid.paste(Image.fromarray(ramp), (bar_left, bar_top))
  draw.text((bar_left - 4, bar_top + 6), "low", fill=(0, 0, 0), font=small, anchor="rm")
  draw.text((bar_left + bar_w + 4, bar_top + 6), "high", fill=(0, 0, 0), font=small, anchor="lm")
  draw.text((gap, bar_top + 18), note, fill=(70, 70, 70), font=small)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)
  return path


def grid_for_records(model, variables: dict, records: Sequence, data_cfg, path: str, *,
                     num_images: int = 6, seed: int = 0, query_position: Optional[Sequence[int]] = None) -> str:
  """Maps of `num_images` seeded records (eval preprocessing), saved as a grid PNG at `path`."""
  from data_pipelines import input_pipeline
  rng = np.random.default_rng(seed)
  chosen = [records[i] for i in np.sort(rng.choice(len(records), min(num_images, len(records)), replace=False))]
  batch = next(input_pipeline.eval_batches(chosen, data_cfg, len(chosen)).as_numpy_iterator())
  maps = compute_maps(model, variables, jnp.asarray(batch["image"]), query_position=query_position)
  height, width = data_cfg.image_size
  raw = np.stack([np.asarray(Image.open(r.path).convert("RGB").resize((width, height), Image.BILINEAR))
                  for r in chosen])
  return save_grid(path, raw, maps)
