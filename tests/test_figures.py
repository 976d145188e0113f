"""Ranked-result pictures: size, green/red frames where expected, and the ranking they show."""

import numpy as np
import pytest
from PIL import Image

from laga_jax.evaluation import figures

CELL, BORDER, GAP, LABEL = (32, 16), 3, 8, 12


@pytest.fixture
def images(tmp_path):
  """Solid-blue query and gallery images of odd sizes (so resizing is exercised)."""
  paths = []
  for i in range(6):
    path = tmp_path / f"img_{i}.jpg"
    Image.new("RGB", (20 + i, 50), (0, 0, 255)).save(path)
    paths.append(str(path))
  return paths


def frame_pixel(picture, row, column):
  """A pixel of the frame around cell (row, column): inside the border, left of the image."""
  framed_h, framed_w = CELL[0] + 2 * BORDER, CELL[1] + 2 * BORDER
  left = GAP + column * (framed_w + GAP)
  top = GAP + row * (LABEL + framed_h + GAP) + LABEL
  return picture.getpixel((left + 1, top + framed_h // 2))


def test_frames_follow_the_ids(tmp_path, images):
  q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 1, 3, 2])
  ranked = np.array([[0, 1, 2], [4, 3, -1]])      # query 1 has only two gallery images left
  target = tmp_path / "out" / "ranks.png"
  figures.save_ranked_results(str(target), images[:2], images[1:], ranked, q_pids, g_pids, topk=3,
                              query_indices=[0, 1], cell=CELL, border=BORDER, gap=GAP, label=LABEL)
  picture = Image.open(target)
  assert picture.format == "PNG"
  assert picture.size == figures.figure_size(2, 3, CELL, BORDER, GAP, LABEL)
  picture = picture.convert("RGB")
  assert frame_pixel(picture, 0, 0) == figures.QUERY
  assert [frame_pixel(picture, 0, c) for c in (1, 2, 3)] == [figures.GREEN, figures.RED, figures.GREEN]
  assert [frame_pixel(picture, 1, c) for c in (1, 2)] == [figures.GREEN, figures.RED]
  assert frame_pixel(picture, 1, 3) == figures.BACKGROUND        # no fourth gallery image
  # The image itself sits inside the frame.
  framed_w = CELL[1] + 2 * BORDER
  centre = (GAP + 2 * (framed_w + GAP) + framed_w // 2, GAP + LABEL + BORDER + CELL[0] // 2)
  r, g, b = picture.getpixel(centre)
  assert b > 200 and r < 50 and g < 50


def test_ranked_gallery_removes_same_id_same_camera():
  qf = np.array([[1.0, 0.0]], np.float32)
  gf = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05]], np.float32)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  g_pids, g_cams = np.array([5, 5, 7, 8]), np.array([0, 1, 0, 0])
  body = figures.ranked_gallery(qf, gf, [0], np.array([5]), g_pids, np.array([0]), g_cams, topk=4)
  np.testing.assert_array_equal(body, [[3, 1, 2, -1]])              # item 0: same id and camera
  hand = figures.ranked_gallery(qf, gf, [0], np.array([5]), g_pids, topk=2)
  np.testing.assert_array_equal(hand, [[0, 3]])


def test_pick_queries_is_seeded():
  a, b = figures.pick_queries(100, 4, seed=3), figures.pick_queries(100, 4, seed=3)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 4 and a.max() < 100
  assert not np.array_equal(a, figures.pick_queries(100, 4, seed=4))
  np.testing.assert_array_equal(figures.pick_queries(3, 10), [0, 1, 2])


def test_bad_ranked_indices_are_named(tmp_path, images):
  with pytest.raises(ValueError, match="ranked_indices"):
    figures.save_ranked_results(str(tmp_path / "x.png"), images, images, np.zeros((2, 2), int),
                                np.zeros(6), np.zeros(6), topk=3)


def test_map_grid_titles_and_one_map(tmp_path):
  """Map grids: two title lines per column, and a grid of a single map (BoT, PCB) is drawn whole."""
  from PIL import Image
  from laga_jax.evaluation import maps
  assert maps.titles("act:layer4_global") == ("activation", "layer4 global")
  assert maps.titles("act:backbone/layer4") == ("activation", "layer4")
  assert maps.titles("act:layer4[spatial]") == ("activation", "layer4 spatial")
  assert maps.titles("sam:sam3@query=4,2") == ("SAM-RPE sam3", "query (4, 2)")
  assert maps.titles("sam:sam4@mean") == ("SAM-RPE sam4", "mean over queries")
  assert maps.titles("cam:cam3") == ("CAM cam3", "channel attention")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 128, 64, 3), dtype=np.uint8)
  path = maps.save_grid(str(tmp_path / "one.png"), images, {"act:backbone/layer4": rng.random((2, 8, 4))},
                        cell_height=128)
  grid = np.asarray(Image.open(path))
  assert grid.shape[0] == 40 + 2 * (128 + 6) + 48
  assert grid.shape[1] >= 200   # widened for the colour bar's note, which two 64-px columns would cut
