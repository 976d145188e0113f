"""Ranked-result pictures (the paper's Fig. 3/4): per query, the query image then its top-k gallery images.

Each gallery image is framed green when it has the query's id and red otherwise, with its rank above it.
"""

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from laga_jax.evaluation import metrics

GREEN = (0, 170, 0)
RED = (220, 0, 0)
QUERY = (40, 40, 40)
BACKGROUND = (255, 255, 255)


def pick_queries(num_queries: int, count: int, seed: int = 0) -> np.ndarray:
  """`count` distinct query indices drawn with `seed` (sorted), or all of them when there are fewer."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_queries, size=min(count, num_queries), replace=False))


def ranked_gallery(qf: np.ndarray, gf: np.ndarray, query_indices: Sequence[int], q_pids: np.ndarray,
                   g_pids: np.ndarray, q_camids: Optional[np.ndarray] = None,
                   g_camids: Optional[np.ndarray] = None, topk: int = 10) -> np.ndarray:
  """(len(query_indices), topk) gallery indices by ascending cosine distance, -1 past the ranking's end.

  As in evaluation, gallery items with the query's id and camera are left out; ties keep gallery order.
  """
  query_indices = np.asarray(query_indices, np.int64)
  dist = np.array(metrics.cosine_distance(np.asarray(qf, np.float32)[query_indices],
                                          np.asarray(gf, np.float32)), np.float64)
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  if q_camids is not None:
    removed = ((g_pids[None, :] == q_pids[query_indices, None])
               & (np.asarray(g_camids)[None, :] == np.asarray(q_camids)[query_indices, None]))
    dist[removed] = np.inf
  order = np.argsort(dist, axis=1, kind="stable")[:, :topk]
  kept = np.take_along_axis(dist, order, axis=1) < np.inf
  return np.pad(np.where(kept, order, -1), ((0, 0), (0, topk - order.shape[1])), constant_values=-1)


def _tile(path: str, size: tuple) -> Image.Image:
  with Image.open(path) as image:
    return image.convert("RGB").resize(size[::-1], Image.BICUBIC)


def figure_size(num_rows: int, topk: int, cell: tuple = (128, 64), border: int = 4, gap: int = 16,
                label: int = 14) -> tuple:
  """(width, height) in pixels of a `save_ranked_results` picture."""
  framed_h, framed_w = cell[0] + 2 * border, cell[1] + 2 * border
  return (gap + (topk + 1) * (framed_w + gap) + gap, gap + num_rows * (label + framed_h + gap))


def save_ranked_results(path: str, query_paths: Sequence[str], gallery_paths: Sequence[str],
                        ranked_indices: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, topk: int = 10, *,
                        query_indices: Optional[Sequence[int]] = None, cell: tuple = (128, 64),
                        border: int = 4, gap: int = 16, label: int = 14) -> None:
  """Write a PNG: one row per query (query image, then its `topk` ranked gallery images, framed by id).

  `ranked_indices` (n, >= topk) holds gallery indices (-1 = none) for the queries `query_indices`
  (default 0..n-1). `cell` is the (height, width) each image is resized to.
  """
  ranked_indices = np.asarray(ranked_indices)
  query_indices = np.arange(len(ranked_indices)) if query_indices is None else np.asarray(query_indices)
  if ranked_indices.ndim != 2 or ranked_indices.shape[1] < topk or len(query_indices) != len(ranked_indices):
    raise ValueError(f"ranked_indices: expected ({len(query_indices)}, >= {topk}) gallery indices, "
                     f"got shape {ranked_indices.shape}")
  q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
  framed_h, framed_w = cell[0] + 2 * border, cell[1] + 2 * border
  canvas = Image.new("RGB", figure_size(len(query_indices), topk, cell, border, gap, label), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for row, (query, ranked) in enumerate(zip(query_indices, ranked_indices)):
    top = gap + row * (label + framed_h + gap) + label
    for column in range(topk + 1):
      left = gap + column * (framed_w + gap)
      if column == 0:
        image_path, colour, text = query_paths[query], QUERY, "query"
      else:
        g = int(ranked[column - 1])
        if g < 0:
          continue
        image_path, text = gallery_paths[g], str(column)
        colour = GREEN if g_pids[g] == q_pids[query] else RED
      draw.rectangle([left, top, left + framed_w - 1, top + framed_h - 1], fill=colour)
      canvas.paste(_tile(image_path, cell), (left + border, top + border))
      draw.text((left, top - label), text, fill=(0, 0, 0))
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  canvas.save(path, format="PNG")
