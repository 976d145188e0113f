"""A small synthetic re-id dataset in the Market-1501 layout, generated in seconds with NumPy and PIL.

Each identity has its own build, skin and hair, shirt (colours and a plain/striped/checked pattern), trousers,
shoes and maybe a bag; each camera has its own background, colour cast and brightness; each image has its own
viewpoint (shift, scale, mirror), stride and sometimes an occluding rectangle. The camera casts keep raw
colour matching imperfect, so a model has to learn something. Output:

  ROOT/bounding_box_train/PPPP_cXs1_FFFFFF_01.jpg
  ROOT/query/...                 one image per test identity per camera
  ROOT/bounding_box_test/...     test identities, plus `0000_*` distractors and `-1_*` junk like Market-1501
  ROOT/demo_dataset.json         parameters and counts, written last

  python -m data_pipelines.demo --root data/demo
  python -m data_pipelines.demo --root data/demo_b --domain 1 --seed 1   # a second site ("demo_b")
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import Optional

import numpy as np
from PIL import Image

MARKER = "demo_dataset.json"
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
# Bumped whenever the drawing changes, so an old dataset on disk is regenerated rather than reused.
GENERATOR_VERSION = 2
_JPEG_QUALITY = 90
_CHUNK = 256  # images rendered per vectorised pass (bounds peak memory)


@dataclasses.dataclass(frozen=True)
class DemoParams:
  """Everything that determines the generated files (recorded in the marker)."""
  num_train_ids: int = 40
  num_test_ids: int = 30
  images_per_id_per_cam: int = 2
  # Six cameras as in Market-1501: a model trained on three learnt those cameras' scenes along with the
  # people, and matched nobody under new cameras (demo_b) at all; with six it carries over to new ones.
  num_cams: int = 6
  num_distractors: int = 10
  num_junk: int = 5
  height: int = 128
  width: int = 64
  seed: int = 0
  domain: int = 0      # 0: the demo look; 1: "demo_b", other cameras (darker, stronger casts, other scenes)

  def validate(self) -> None:
    for name in ("num_train_ids", "num_test_ids", "images_per_id_per_cam", "height", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"demo dataset: {name} must be >= 1, got {getattr(self, name)}")
    if not 2 <= self.num_cams <= 9:
      raise ValueError(f"demo dataset: num_cams must be in [2, 9] (cross-camera queries, one-digit camera "
                       f"ids as in Market-1501), got {self.num_cams}")
    if self.num_distractors < 0 or self.num_junk < 0:
      raise ValueError("demo dataset: num_distractors and num_junk must be >= 0")
    if self.domain not in DOMAINS:
      raise ValueError(f"demo dataset: domain must be one of {sorted(DOMAINS)}, got {self.domain}")
    if self.num_train_ids + self.num_test_ids > 1500:
      raise ValueError("demo dataset: at most 1500 identities (4-digit Market-1501 ids)")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB in [0, 1]; returns shape h.shape + (3,)."""
  k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _random_colours(rng: np.random.Generator, n: int, dark_fraction: float = 0.3) -> np.ndarray:
  """Clothing-like colours: mostly saturated hues, a share of dark/grey ones (common in real footage)."""
  hue = rng.random(n)
  sat = rng.uniform(0.35, 0.95, n)
  val = rng.uniform(0.35, 0.95, n)
  grey = rng.random(n) < dark_fraction
  sat = np.where(grey, rng.uniform(0.0, 0.15, n), sat)
  val = np.where(grey, rng.uniform(0.1, 0.8, n), val)
  return _hsv_to_rgb(hue, sat, val)


def _identities(rng: np.random.Generator, n: int) -> dict:
  """Appearance of `n` identities; every entry has leading axis n."""
  return {
      "shirt": _random_colours(rng, n),
      "shirt2": _random_colours(rng, n, dark_fraction=0.5),
      "pattern": rng.integers(0, 4, n),                 # plain, horizontal stripes, vertical stripes, checks
      "stripes": rng.uniform(4.0, 9.0, n),              # pattern periods over the torso height
      "long_sleeves": rng.random(n) < 0.5,
      "trousers": _random_colours(rng, n, dark_fraction=0.5),
      "shorts": rng.random(n) < 0.2,
      "shoes": _random_colours(rng, n, dark_fraction=0.7),
      "skin": _hsv_to_rgb(rng.uniform(0.02, 0.1, n), rng.uniform(0.25, 0.6, n), rng.uniform(0.35, 0.95, n)),
      "hair": _hsv_to_rgb(rng.uniform(0.0, 0.12, n), rng.uniform(0.2, 0.7, n), rng.uniform(0.05, 0.6, n)),
      "long_hair": rng.random(n) < 0.3,
      "bag": rng.random(n) < 0.4,
      "bag_colour": _random_colours(rng, n, dark_fraction=0.5),
      "build": rng.uniform(0.85, 1.15, n),              # shoulder width factor
  }


# Camera looks per domain: (wall/sky scale, offset), (floor scale, offset), cast range, brightness range,
# horizon range. Domain 1 is a second "site" for cross-domain tests: dim indoor scenes with strong casts.
DOMAINS = {
    0: dict(sky=(0.8, 0.1), floor=(0.7, 0.1), cast=(0.75, 1.25), brightness=(0.7, 1.15), horizon=(0.55, 0.8)),
    1: dict(sky=(0.45, 0.05), floor=(0.5, 0.2), cast=(0.6, 1.4), brightness=(0.5, 0.85), horizon=(0.7, 0.9)),
}


def _cameras(rng: np.random.Generator, n: int, domain: int = 0) -> dict:
  """Background and lighting of `n` cameras of site `domain`."""
  look = DOMAINS[domain]
  return {
      "sky": _random_colours(rng, n, dark_fraction=0.5) * look["sky"][0] + look["sky"][1],
      "floor": _random_colours(rng, n, dark_fraction=0.6) * look["floor"][0] + look["floor"][1],
      "pillar": _random_colours(rng, n, dark_fraction=0.5),
      "pillar_x": rng.uniform(0.0, 1.0, n),
      "horizon": rng.uniform(*look["horizon"], n),
      "cast": rng.uniform(*look["cast"], (n, 3)),       # per-channel gain: the camera's colour cast
      "brightness": rng.uniform(*look["brightness"], n),
  }


def _views(rng: np.random.Generator, n: int, *, crop: bool = False) -> dict:
  """Per-image viewpoint, stride, lighting jitter and occluder; `crop` zooms in like a bad detection."""
  scale = rng.uniform(1.3, 1.8, n) if crop else rng.uniform(0.82, 1.02, n)
  return {
      "x": 0.5 + rng.uniform(-0.4, 0.4, n) * (1.0 if crop else 0.25),
      "top": rng.uniform(-0.4, 0.0, n) if crop else rng.uniform(0.01, 0.06, n),
      "scale": scale,
      "mirror": np.where(rng.random(n) < 0.5, -1.0, 1.0),
      "stride": rng.uniform(0.0, 1.0, n),
      "bg_shift": rng.uniform(-0.15, 0.15, n),
      "light": rng.uniform(0.92, 1.08, n),
      "occluded": rng.random(n) < 0.25,
      "occ_box": np.sort(rng.random((n, 2, 2)), axis=2),  # [[y0, y1], [x0, x1]] in image fractions
      "occ_colour": _random_colours(rng, n, dark_fraction=0.4),
  }


def _take(table: dict, index: np.ndarray) -> dict:
  return {k: v[index] for k, v in table.items()}


def _box(u: np.ndarray, v: np.ndarray, u0, u1, v0, v1) -> np.ndarray:
  return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def _person_layers(people: dict, views: dict, u: np.ndarray, v: np.ndarray, col) -> list:
  """(mask, colour) pairs of one person, back to front; masks broadcast to (N, H, W), colours are (N, 3)."""
  stride = 0.06 * col(views["stride"])
  left = lambda u0, u1, v0, v1: _box(u, v, u0 - stride, u1 - stride * 0.3, v0, v1)
  right = lambda u0, u1, v0, v1: _box(u, v, u0 + stride * 0.3, u1 + stride, v0, v1)
  legs = left(-0.17, -0.01, 0.52, 0.95) | right(0.01, 0.17, 0.52, 0.95)
  shorts = col(people["shorts"]).astype(bool)
  arms = _box(np.abs(u), v, 0.19, 0.27, 0.16, 0.5)
  sleeves = (v < 0.3) | col(people["long_sleeves"]).astype(bool)
  torso = _box(np.abs(u), v, -1.0, 0.2 - 0.03 * (v - 0.15), 0.15, 0.55)
  period = col(people["stripes"]) / 0.4
  horizontal = np.sin(2 * np.pi * period * v) > 0
  vertical = np.sin(np.pi * period * u) > 0
  pattern = col(people["pattern"])
  second = (((pattern == 1) & horizontal) | ((pattern == 2) & vertical)
            | ((pattern == 3) & (horizontal ^ vertical)))
  head = (u / 0.12) ** 2 + ((v - 0.08) / 0.07) ** 2 < 1.0
  long_hair = col(people["long_hair"]).astype(bool) & _box(np.abs(u), v, -1.0, 0.13, 0.04, 0.22)
  # The bag hangs on the body's left: the viewpoint mirror decides whether the camera sees it.
  bag = col(people["bag"]).astype(bool) & _box(u, v, -0.33, -0.18, 0.3, 0.58)
  return [
      (legs, people["trousers"]),
      (legs & shorts & (v > 0.72), people["skin"]),
      (left(-0.19, -0.01, 0.92, 0.98) | right(0.01, 0.19, 0.92, 0.98), people["shoes"]),
      (arms & sleeves, people["shirt"]),
      (arms & ~sleeves, people["skin"]),
      (torso & ~second, people["shirt"]),
      (torso & second, people["shirt2"]),
      (head, people["skin"]),
      ((head & (v < 0.06)) | (long_hair & ~(head & (v > 0.06))), people["hair"]),
      (bag, people["bag_colour"]),
  ]


def render(people: dict, cams: dict, views: dict, height: int, width: int, rng: np.random.Generator,
           person_visible: Optional[np.ndarray] = None) -> np.ndarray:
  """Draw N images (uint8, N x height x width x 3) from per-image people, camera and view tables."""
  n = len(views["x"])
  col = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)
  yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
  xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]

  # Person in body coordinates: u across (image widths, mirrored by the viewpoint), v down (0 head, 1 feet).
  scale = col(views["scale"])
  u = (xx - col(views["x"])) / (scale * col(people["build"])) * col(views["mirror"])
  v = (yy - col(views["top"])) / (0.93 * scale)
  layers = _person_layers(people, views, u, v, col)
  box = views["occ_box"]
  occluder = (col(views["occluded"]).astype(bool) & (yy >= col(box[:, 0, 0])) & (yy < col(box[:, 0, 1]))
              & (xx >= col(box[:, 1, 0])) & (xx < col(box[:, 1, 1])))
  visible = np.ones(n, bool) if person_visible is None else np.asarray(person_visible, bool)
  # Paint a label map (0 = background) and look colours up once, instead of blending N x H x W x 3 per layer.
  label = np.zeros((n, height, width), np.int32)
  for i, (mask, _) in enumerate(layers, start=1):
    label = np.where(mask & visible[:, None, None], i, label)
  label = np.where(occluder, len(layers) + 1, label)
  palette = np.stack([np.zeros((n, 3))] + [c for _, c in layers] + [views["occ_colour"]], axis=1)
  foreground = palette.astype(np.float32)[np.arange(n)[:, None, None], label]

  # Background: wall above the camera's horizon, floor below, one pillar; shifted a little per image.
  floor = (yy > col(cams["horizon"]))[..., None]
  pillar = ((np.abs((xx + col(views["bg_shift"])) % 1.0 - col(cams["pillar_x"])) < 0.08)[..., None] & ~floor)
  rgb = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1, 3)
  background = np.where(floor, rgb(cams["floor"]) * (0.8 + 0.4 * yy[..., None]),
                        np.where(pillar, rgb(cams["pillar"]), rgb(cams["sky"]) * (1.1 - 0.3 * yy[..., None])))
  image = np.where((label == 0)[..., None], background, foreground)

  gain = rgb(cams["cast"]) * col(cams["brightness"] * views["light"])[..., None]
  noise = rng.standard_normal(image.shape, dtype=np.float32) * 0.02
  return np.clip((image * gain + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _plan(p: DemoParams, rng: np.random.Generator) -> list:
  """Rows (folder, pid, identity row, cam, kind) for every image; kind: person / distractor / junk."""
  pids = np.sort(rng.choice(np.arange(1, 1501), p.num_train_ids + p.num_test_ids, replace=False))
  order = rng.permutation(len(pids))
  train, test = order[:p.num_train_ids], order[p.num_train_ids:]
  rows = []
  for folder, rows_ids, per_cam in (("bounding_box_train", train, p.images_per_id_per_cam),
                                    ("query", test, 1),
                                    ("bounding_box_test", test, p.images_per_id_per_cam)):
    for ident in np.sort(rows_ids):
      for cam in range(1, p.num_cams + 1):
        rows += [(folder, int(pids[ident]), int(ident), cam, "person")] * per_cam
  rows += [("bounding_box_test", 0, -1, int(c), "distractor") for c in rng.integers(1, p.num_cams + 1,
                                                                                   p.num_distractors)]
  rows += [("bounding_box_test", -1, -1, int(c), "junk") for c in rng.integers(1, p.num_cams + 1, p.num_junk)]
  return rows


def _draw_all(p: DemoParams, rows: list, rng: np.random.Generator) -> np.ndarray:
  """Images for the `_plan` rows, rendered in vectorised chunks."""
  num_people = p.num_train_ids + p.num_test_ids
  people = _identities(rng, num_people + len(rows))  # the extra rows give distractors their own looks
  cams = _cameras(rng, p.num_cams, p.domain)
  kind = np.array([r[4] for r in rows])
  views = _views(rng, len(rows))
  cropped = _views(rng, len(rows), crop=True)
  views = {k: np.where(np.reshape(kind == "distractor", (-1,) + (1,) * (v.ndim - 1)), cropped[k], v)
           for k, v in views.items()}
  ident = np.array([r[2] for r in rows])
  ident = np.where(ident >= 0, ident, num_people + np.arange(len(rows)))
  cam = np.array([r[3] for r in rows]) - 1
  images = [render(_take(people, ident[s]), _take(cams, cam[s]), _take(views, np.arange(len(rows))[s]),
                   p.height, p.width, rng, person_visible=(kind[s] != "junk"))
            for s in (slice(i, i + _CHUNK) for i in range(0, len(rows), _CHUNK))]
  return np.concatenate(images)


def _write(p: DemoParams, target: pathlib.Path) -> dict:
  """Draw and save every image under `target`; returns the image count per folder."""
  rng = np.random.default_rng(p.seed)
  rows = _plan(p, rng)
  images = _draw_all(p, rows, rng)
  # Unique 6-digit frame numbers make every file name unique, as in Market-1501.
  frames = np.sort(rng.choice(np.arange(1, 1_000_000), len(rows), replace=False))
  counts = {}
  for folder in FOLDERS:
    (target / folder).mkdir(parents=True)
  for (folder, pid, _, cam, _), frame, image in zip(rows, frames, images):
    name = f"{pid:04d}" if pid >= 0 else "-1"
    Image.fromarray(image).save(target / folder / f"{name}_c{cam}s1_{frame:06d}_01.jpg", quality=_JPEG_QUALITY)
    counts[folder] = counts.get(folder, 0) + 1
  return counts


def _marker_matches(root: pathlib.Path, params: dict) -> bool:
  try:
    marker = json.loads((root / MARKER).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return False
  return marker.get("params") == params and marker.get("generator_version") == GENERATOR_VERSION


def generate_demo_dataset(root, *, num_train_ids: int = DemoParams.num_train_ids,
                          num_test_ids: int = DemoParams.num_test_ids,
                          images_per_id_per_cam: int = DemoParams.images_per_id_per_cam,
                          num_cams: int = DemoParams.num_cams, num_distractors: int = DemoParams.num_distractors,
                          num_junk: int = DemoParams.num_junk, height: int = DemoParams.height,
                          width: int = DemoParams.width, seed: int = DemoParams.seed,
                          domain: int = DemoParams.domain) -> pathlib.Path:
  """Write the demo dataset under `root` (Market-1501 layout) unless an identical one is already there.

  `domain=1` with another `seed` draws the "demo_b" set: other identities seen by other cameras.
  """
  params = DemoParams(num_train_ids, num_test_ids, images_per_id_per_cam, num_cams, num_distractors, num_junk,
                      height, width, seed, domain)
  params.validate()
  root = pathlib.Path(root)
  wanted = dataclasses.asdict(params)
  if _marker_matches(root, wanted):
    return root
  if not (root / MARKER).exists() and any((root / f).exists() for f in FOLDERS):
    raise FileExistsError(f"{root} already holds Market-1501 folders that the demo generator did not write "
                          f"(no {MARKER}); refusing to overwrite them: pick another root")
  root.mkdir(parents=True, exist_ok=True)
  # Draw into a scratch folder and move it in place, so an interrupted run never looks complete.
  with tempfile.TemporaryDirectory(dir=root, prefix=".demo_tmp_") as scratch:
    counts = _write(params, pathlib.Path(scratch))
    (root / MARKER).unlink(missing_ok=True)
    for folder in FOLDERS:
      if (root / folder).exists():
        shutil.rmtree(root / folder)
      (pathlib.Path(scratch) / folder).rename(root / folder)
  (root / MARKER).write_text(json.dumps(
      {"generator_version": GENERATOR_VERSION, "params": wanted, "counts": counts}, indent=2) + "\n")
  return root


def main(argv: Optional[list] = None) -> None:
  defaults = DemoParams()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="output folder (Market-1501 layout)")
  for field in dataclasses.fields(DemoParams):
    parser.add_argument("--" + field.name, type=int, default=getattr(defaults, field.name))
  args = vars(parser.parse_args(argv))
  root = generate_demo_dataset(args.pop("root"), **args)
  print(f"demo dataset at {root}: {json.loads((root / MARKER).read_text())['counts']}")


if __name__ == "__main__":
  main()
