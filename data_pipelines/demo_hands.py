"""A small synthetic hand set in the 11k Hands layout, generated in seconds with NumPy and PIL.

It exercises the whole hand protocol of the paper (Table II/V) without a download: `HandInfo.csv` with the
11k columns (quoted, zero-padded ids, one id written with a trailing space as in the real file), four
aspects (dorsal/palmar x right/left), rows with accessories (rings, bracelets; the parser leaves them out),
identities with only one or two images in an aspect, and identities missing from an aspect.

Each person has a skin tone, a hand shape (palm size, finger lengths and widths) and, per hand, marks
(moles on the back, creases on the palm) and maybe nail polish; the left hand is the mirror image of a hand
of the same shape with its own marks. Each photo has its own pose (rotation, shift, scale, finger spread),
lighting, colour cast and background shade, so raw pixels match poorly and a model has to learn the hand.

  ROOT/HandInfo.csv                 id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,...
  ROOT/Hands/Hand_0000001.jpg ...   landscape photos (default 120 x 160)
  ROOT/demo_hands_dataset.json      parameters and counts, written last

  python -m data_pipelines.demo_hands --root data/demo_hands
"""

import argparse
import csv
import dataclasses
import json
import pathlib
import shutil
import tempfile
from typing import Optional

import numpy as np
from PIL import Image

MARKER = "demo_hands_dataset.json"
INFO_FILE = "HandInfo.csv"
IMAGES_DIR = "Hands"
COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName",
           "irregularities")
ASPECTS = ("dorsal right", "dorsal left", "palmar right", "palmar left")
# Bumped whenever the drawing changes, so an old dataset on disk is regenerated rather than reused.
GENERATOR_VERSION = 3
_JPEG_QUALITY = 90
_CHUNK = 128  # images rendered per vectorised pass (bounds peak memory)
# An 11k id really is written with a trailing space once ('1200000 '); the demo keeps that trap.
PADDED_ID = 1_200_000


@dataclasses.dataclass(frozen=True)
class DemoHandParams:
  """Everything that determines the generated files (recorded in the marker)."""
  num_ids: int = 60                 # people; per aspect the first half of the ids (sorted) train
  min_images: int = 6               # images per person per aspect, without accessories
  max_images: int = 9
  few_image_ids: int = 6            # people with only 1-2 images in some aspects
  missing_aspect_ids: int = 4       # people absent from one aspect
  accessory_fraction: float = 0.3   # share of people with extra photos wearing a ring or a bracelet
  height: int = 120
  width: int = 160
  seed: int = 0

  def validate(self) -> None:
    for name in ("num_ids", "min_images", "height", "width"):
      if getattr(self, name) < 1:
        raise ValueError(f"demo hands: {name} must be >= 1, got {getattr(self, name)}")
    if self.num_ids < 4:
      raise ValueError(f"demo hands: num_ids must be >= 4 (train and test identities), got {self.num_ids}")
    if self.max_images < self.min_images:
      raise ValueError(f"demo hands: max_images ({self.max_images}) < min_images ({self.min_images})")
    if not 0 <= self.few_image_ids + self.missing_aspect_ids <= self.num_ids:
      raise ValueError("demo hands: few_image_ids + missing_aspect_ids must be in [0, num_ids]")
    if not 0.0 <= self.accessory_fraction <= 1.0:
      raise ValueError(f"demo hands: accessory_fraction must be in [0, 1], got {self.accessory_fraction}")


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB in [0, 1], shape h.shape + (3,)."""
  k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _people(rng: np.random.Generator, n: int) -> dict:
  """Per person: skin, shape, and per hand side (0 right, 1 left) marks and polish; leading axis n."""
  base_len = np.array([0.62, 0.72, 0.68, 0.52, 0.50])   # index, middle, ring, little, thumb (x palm height)
  tone = rng.uniform(0.0, 1.0, n)
  skin = np.stack([0.93 - 0.5 * tone, 0.76 - 0.48 * tone, 0.64 - 0.42 * tone], axis=1)
  skin = np.clip(skin * rng.uniform(0.93, 1.07, (n, 3)), 0, 1)
  return {
      "skin": skin,
      "palm_w": rng.uniform(0.17, 0.25, n),                        # palm half-width (x image height)
      "palm_h": rng.uniform(0.20, 0.26, n),                        # palm half-height
      "finger_len": base_len * rng.uniform(0.8, 1.2, (n, 5)),      # the shape signature
      "finger_w": rng.uniform(0.035, 0.055, n),
      "thumb_angle": rng.uniform(0.5, 1.0, n),                     # radians away from the palm
      # Marks per hand side: up to 3 moles on the back (palm coordinates) and 2 palm creases.
      "moles": rng.uniform(-0.8, 0.8, (n, 2, 3, 2)),
      "mole_on": rng.random((n, 2, 3)) < 0.7,
      "mole_r": rng.uniform(0.018, 0.032, (n, 2, 3)),
      "crease": rng.uniform(-0.5, 0.5, (n, 2, 2, 3)),              # y = a + b x + c x^2
      "polish": rng.random(n) < 0.5,
      "polish_colour": _hsv(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.5, 0.95, n)),
      # A birthmark or tattoo on the back of some hands: position (palm units), radius, colour.
      "tattoo": rng.random((n, 2)) < 0.85,
      "tattoo_at": rng.uniform(-0.5, 0.5, (n, 2, 2)),
      "tattoo_r": rng.uniform(0.07, 0.11, (n, 2)),
      "tattoo_colour": _hsv(rng.random((n, 2)), rng.uniform(0.4, 0.9, (n, 2)), rng.uniform(0.2, 0.7, (n, 2))),
  }


_SUPERSAMPLE = 2  # drawn at twice the size and reduced: smooth outlines


def _ellipse(cx: float, cy: float, rx: float, ry: float, num: int = 28) -> np.ndarray:
  t = np.linspace(0.0, 2 * np.pi, num, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _draw_one(person: dict, view: dict, height: int, width: int) -> np.ndarray:
  """One photo (float32 RGB in [0, 1], before lighting and noise) of `person` in pose `view`."""
  from PIL import ImageDraw

  ss = _SUPERSAMPLE
  cos, sin, mirror = np.cos(view["angle"]), np.sin(view["angle"]), view["mirror"]
  scale = view["scale"] * height * ss

  # Hand coordinates (units of image height): origin at the palm centre, v towards the fingers, u towards
  # the little finger of a right hand seen from the back; `mirror` flips u (left hands, palmar views).
  def px(points) -> list:
    points = np.asarray(points, np.float64).reshape(-1, 2)
    u, v = points[:, 0] * mirror, points[:, 1]
    x = view["cx"] * height * ss + (cos * u - sin * v) * scale
    y = view["cy"] * height * ss - (sin * u + cos * v) * scale
    return [(float(a), float(b)) for a, b in zip(x, y)]

  def colour(rgb) -> tuple:
    return tuple(int(round(255 * min(max(c, 0.0), 1.0))) for c in rgb)

  canvas = Image.new("RGB", (width * ss, height * ss), colour(view["background"]))
  draw = ImageDraw.Draw(canvas)
  pw, ph, fw = person["palm_w"], person["palm_h"], person["finger_w"]
  skin = np.asarray(person["skin"]) * (1.08 if view["palmar"] else 1.0) + (0.04 if view["palmar"] else 0.0)
  draw.polygon(px([(-0.8 * pw, 0.0), (0.8 * pw, 0.0), (0.85 * pw, -3.0), (-0.85 * pw, -3.0)]), fill=colour(skin))
  draw.polygon(px(_ellipse(0.0, 0.0, pw, ph)), fill=colour(skin))

  def capsule(x0, y0, x1, y1, r, fill):
    (a, b), = px([(x0, y0)])
    (c, d), = px([(x1, y1)])
    rr = r * scale
    draw.line([(a, b), (c, d)], fill=fill, width=max(1, int(round(2 * rr))))
    for e, f in ((a, b), (c, d)):
      draw.ellipse([e - rr, f - rr, e + rr, f + rr], fill=fill)

  tips = []
  for i, base_x in enumerate((-0.66, -0.22, 0.22, 0.64)):  # index .. little finger
    x0, y0 = base_x * pw, 0.82 * np.sqrt(1 - base_x ** 2) * ph
    direction = view["spread"] * (i - 1.3) * 0.13
    length = person["finger_len"][i] * ph * 2
    tips.append((x0, y0, x0 + length * np.sin(direction), y0 + length * np.cos(direction), fw * (1 - 0.08 * i)))
  theta = person["thumb_angle"] + view["spread"] * 0.15
  length = person["finger_len"][4] * ph * 2
  tx0, ty0 = -0.85 * pw, -0.25 * ph
  tips.append((tx0, ty0, tx0 - length * np.sin(theta), ty0 + length * np.cos(theta), fw * 1.15))
  for x0, y0, x1, y1, r in tips:
    capsule(x0, y0, x1, y1, r, colour(skin))

  side = view["side"]
  if view["palmar"]:
    for a, b, c in person["crease"][side]:  # two palm creases, v = a + b u + c u^2 (palm units)
      us = np.linspace(-0.75, 0.75, 12)
      vs = (a + b * us + c * us ** 2) * 0.7
      inside = us ** 2 + vs ** 2 <= 0.8
      if inside.sum() >= 2:
        draw.line(px(np.stack([us[inside] * pw, vs[inside] * ph], 1)), fill=colour(skin * 0.7),
                  width=max(1, int(round(0.022 * scale))))
  else:
    nail = colour(person["polish_colour"]) if person["polish"] else colour(skin * 1.1 + 0.05)
    for x0, y0, x1, y1, r in tips:
      (a, b), = px([(x0 + 0.85 * (x1 - x0), y0 + 0.85 * (y1 - y0))])
      rr = 0.8 * r * scale
      draw.ellipse([a - rr, b - rr, a + rr, b + rr], fill=nail)
    if person["tattoo"][side]:
      (a, b), = px([person["tattoo_at"][side] * np.array([pw, ph])])
      rr = person["tattoo_r"][side] * scale
      draw.ellipse([a - rr, b - rr * 0.8, a + rr, b + rr * 0.8], fill=colour(person["tattoo_colour"][side]))
    for (mx, my), on, radius in zip(person["moles"][side], person["mole_on"][side], person["mole_r"][side]):
      if on and mx ** 2 + my ** 2 <= 0.8:
        (a, b), = px([(mx * pw, my * ph)])
        rr = radius * scale
        draw.ellipse([a - rr, b - rr, a + rr, b + rr], fill=colour(skin * 0.45))
  metal = colour(view["metal"])
  if view["accessory"] == 1:  # a ring on the ring finger
    x0, y0, x1, y1, r = tips[2]
    rx, ry = x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0)
    ux, uy = (x1 - x0) / np.hypot(x1 - x0, y1 - y0), (y1 - y0) / np.hypot(x1 - x0, y1 - y0)
    capsule(rx - uy * 1.1 * r, ry + ux * 1.1 * r, rx + uy * 1.1 * r, ry - ux * 1.1 * r, 0.02, metal)
  elif view["accessory"] == 2:  # a bracelet at the wrist
    draw.polygon(px([(-0.9 * pw, -0.75 * ph), (0.9 * pw, -0.75 * ph), (0.9 * pw, -0.92 * ph),
                     (-0.9 * pw, -0.92 * ph)]), fill=metal)
  return np.asarray(canvas.reduce(ss), np.float32) / 255.0


def render(people: dict, views: dict, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """Draw N hand photos (uint8, N x height x width x 3) from per-image people and view tables."""
  n = len(views["angle"])
  images = np.stack([_draw_one({k: v[i] for k, v in people.items()}, {k: v[i] for k, v in views.items()},
                               height, width) for i in range(n)])
  shade = (1.0 - 0.08 * (np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None, None]
  gain = (np.asarray(views["cast"], np.float32) * np.asarray(views["light"], np.float32)[:, None])[:, None, None]
  noise = rng.standard_normal(images.shape, dtype=np.float32) * 0.02
  return np.clip((images * shade * gain + noise) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _plan(p: DemoHandParams, rng: np.random.Generator) -> tuple:
  """(person ids, rows): rows are (person index, aspect, accessory 0/1/2) for every photo."""
  ids = np.sort(rng.choice(np.arange(1, 2000), p.num_ids, replace=False))
  ids[-1] = PADDED_ID  # sorts last, so the padded id is a test identity of every aspect it appears in
  order = rng.permutation(p.num_ids)
  few = set(order[:p.few_image_ids].tolist())
  missing = {int(i): int(rng.integers(len(ASPECTS))) for i in order[p.few_image_ids:
                                                                    p.few_image_ids + p.missing_aspect_ids]}
  wearers = rng.random(p.num_ids) < p.accessory_fraction
  rows = []
  for person in range(p.num_ids):
    for a, aspect in enumerate(ASPECTS):
      if missing.get(person) == a:
        continue
      count = int(rng.integers(1, 3)) if person in few and rng.random() < 0.6 else \
          int(rng.integers(p.min_images, p.max_images + 1))
      rows += [(person, aspect, 0)] * count
      if wearers[person]:
        rows += [(person, aspect, int(rng.integers(1, 3)))] * int(rng.integers(1, 4))
  return ids, rows


def _views(rng: np.random.Generator, rows: list, height: int, width: int) -> dict:
  n = len(rows)
  aspect = np.array([r[1] for r in rows])
  side = np.where(np.char.endswith(aspect.astype(str), "left"), 1, 0)
  palmar = np.char.startswith(aspect.astype(str), "palmar")
  return {
      "side": side,
      "palmar": palmar,
      # Thumb on the image's left for a right hand seen from the back; left hands and palms mirror that.
      "mirror": np.where((side == 1) ^ palmar, -1.0, 1.0),
      "angle": rng.normal(0.0, 0.18, n),
      "cx": width / height * 0.5 + rng.uniform(-0.08, 0.08, n),
      "cy": rng.uniform(0.58, 0.68, n),
      "scale": rng.uniform(0.85, 1.1, n),
      "spread": rng.uniform(0.6, 1.4, n),
      "light": rng.uniform(0.92, 1.08, n),
      "cast": rng.uniform(0.97, 1.03, (n, 3)),
      # Sheets, desks, walls: the background changes from photo to photo much more than the hand does.
      "background": _hsv(rng.random(n), rng.uniform(0.0, 0.4, n), rng.uniform(0.35, 1.0, n)),
      "accessory": np.array([r[2] for r in rows]),
      "metal": np.where(rng.random((n, 1)) < 0.5, [[0.85, 0.7, 0.25]], [[0.75, 0.75, 0.78]]),
  }


def _take(table: dict, index: np.ndarray) -> dict:
  return {k: v[index] for k, v in table.items()}


def _write(p: DemoHandParams, target: pathlib.Path) -> dict:
  """Draw and save every photo and HandInfo.csv under `target`; returns counts."""
  rng = np.random.default_rng(p.seed)
  ids, rows = _plan(p, rng)
  people = _people(rng, p.num_ids)
  views = _views(rng, rows, p.height, p.width)
  person = np.array([r[0] for r in rows])
  (target / IMAGES_DIR).mkdir(parents=True)
  ages = rng.integers(18, 76, p.num_ids)
  genders = np.where(rng.random(p.num_ids) < 0.5, "male", "female")
  tone_names = np.array(["very fair", "fair", "medium", "dark"])[
      np.clip(((0.93 - people["skin"][:, 0]) / 0.5 * 4).astype(int), 0, 3)]
  table = []
  padded_pending = True
  for start in range(0, len(rows), _CHUNK):
    index = np.arange(start, min(start + _CHUNK, len(rows)))
    images = render(_take(people, person[index]), _take(views, index), p.height, p.width, rng)
    for i, image in zip(index, images):
      name = f"Hand_{i + 1:07d}.jpg"
      Image.fromarray(image).save(target / IMAGES_DIR / name, quality=_JPEG_QUALITY)
      who, aspect, accessory = rows[i]
      pid = f"{ids[who]:07d}"
      if ids[who] == PADDED_ID and padded_pending and not accessory:
        pid, padded_pending = pid + " ", False
      polish = int(people["polish"][who] and not views["palmar"][i])
      table.append([pid, int(ages[who]), str(genders[who]), str(tone_names[who]), int(accessory > 0), polish,
                    aspect, name, 0])
  with open(target / INFO_FILE, "w", newline="", encoding="utf-8") as f:
    f.write(",".join(COLUMNS) + "\n")  # 11k: a bare header, strings quoted, numbers bare
    csv.writer(f, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerows(table)
  counts = {aspect: sum(1 for r in rows if r[1] == aspect and r[2] == 0) for aspect in ASPECTS}
  counts["with_accessories"] = sum(1 for r in rows if r[2])
  counts["images"] = len(rows)
  return counts


def _marker_matches(root: pathlib.Path, params: dict) -> bool:
  try:
    marker = json.loads((root / MARKER).read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return False
  return marker.get("params") == params and marker.get("generator_version") == GENERATOR_VERSION


def generate_demo_hands(root, **overrides) -> pathlib.Path:
  """Write the demo hand set under `root` (11k layout) unless an identical one is already there.

  Keyword arguments override `DemoHandParams` fields.
  """
  unknown = set(overrides) - {f.name for f in dataclasses.fields(DemoHandParams)}
  if unknown:
    raise TypeError(f"demo hands: unknown parameter(s) {sorted(unknown)}")
  params = DemoHandParams(**overrides)
  params.validate()
  root = pathlib.Path(root)
  wanted = dataclasses.asdict(params)
  if _marker_matches(root, wanted):
    return root
  if not (root / MARKER).exists() and any((root / f).exists() for f in (INFO_FILE, IMAGES_DIR)):
    raise FileExistsError(f"{root} already holds {INFO_FILE} or {IMAGES_DIR}/ that the demo generator did not "
                          f"write (no {MARKER}); refusing to overwrite them: pick another root")
  root.mkdir(parents=True, exist_ok=True)
  # Draw into a scratch folder and move it in place, so an interrupted run never looks complete.
  with tempfile.TemporaryDirectory(dir=root, prefix=".demo_tmp_") as scratch:
    counts = _write(params, pathlib.Path(scratch))
    (root / MARKER).unlink(missing_ok=True)
    for entry in (INFO_FILE, IMAGES_DIR):
      if (root / entry).is_dir():
        shutil.rmtree(root / entry)
      elif (root / entry).exists():
        (root / entry).unlink()
      (pathlib.Path(scratch) / entry).rename(root / entry)
  (root / MARKER).write_text(json.dumps(
      {"generator_version": GENERATOR_VERSION, "params": wanted, "counts": counts}, indent=2) + "\n")
  return root


def main(argv: Optional[list] = None) -> None:
  defaults = DemoHandParams()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, help="output folder (11k Hands layout)")
  for field in dataclasses.fields(DemoHandParams):
    parser.add_argument("--" + field.name, type=type(getattr(defaults, field.name)),
                        default=getattr(defaults, field.name))
  args = vars(parser.parse_args(argv))
  root = generate_demo_hands(args.pop("root"), **args)
  print(f"demo hand set at {root}: {json.loads((root / MARKER).read_text())['counts']}")


if __name__ == "__main__":
  main()
