"""The generated hand set (11k layout) and the hand split's labels: every label < the number of classes."""

import csv
import hashlib
import json

import pytest
from PIL import Image

from data_pipelines import datasets, demo_hands
from data_pipelines.datasets import common
from data_pipelines.datasets.common import Record

SMALL = dict(num_ids=10, min_images=2, max_images=3, few_image_ids=3, missing_aspect_ids=2, accessory_fraction=0.5,
             height=36, width=48)
ASPECTS = ("dorsal right", "dorsal left", "palmar right", "palmar left")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
  return demo_hands.generate_demo_hands(tmp_path_factory.mktemp("hands") / "set", **SMALL)


def _rows(root):
  with open(root / "HandInfo.csv", newline="") as f:
    return list(csv.DictReader(f))


def test_11k_layout(small_root):
  text = (small_root / "HandInfo.csv").read_text()
  header, first = text.splitlines()[:2]
  assert header == "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"
  assert first.startswith('"0') and first.count('"') == 10  # quoted strings, bare numbers, as in 11k
  rows = _rows(small_root)
  assert {r["aspectOfHand"] for r in rows} == set(ASPECTS)
  assert {r["accessories"] for r in rows} == {"0", "1"}
  assert sum(r["id"] == "1200000 " for r in rows) == 1  # the padded id of the real file
  for r in rows[:5]:
    with Image.open(small_root / "Hands" / r["imageName"]) as image:
      assert image.format == "JPEG" and image.size == (48, 36)
  marker = json.loads((small_root / demo_hands.MARKER).read_text())
  assert marker["counts"]["images"] == len(rows) == len(list((small_root / "Hands").iterdir()))
  per_id = {}
  for r in rows:
    if r["accessories"] == "0":
      per_id.setdefault((r["id"].strip(), r["aspectOfHand"]), 0)
      per_id[(r["id"].strip(), r["aspectOfHand"])] += 1
  assert min(per_id.values()) == 1  # ids with few images
  ids = {r["id"].strip() for r in rows}
  assert any(sum((i, a) in per_id for a in ASPECTS) < 4 for i in ids)  # ids missing from an aspect


@pytest.mark.parametrize("aspect", ["dorsal right", "palmar_left"])
def test_hand_protocol_splits(small_root, aspect):
  splits = datasets.load_splits("demo_hands", small_root, aspect=aspect)
  train, val, query, gallery = (splits[k] for k in ("train", "val", "query", "gallery"))
  num_classes = len({r.label for r in train})
  assert sorted({r.label for r in train}) == list(range(num_classes))
  assert all(0 <= r.label < num_classes for r in val)
  assert not {r.path for r in val} & {r.path for r in train}
  accessory_images = {r["imageName"] for r in _rows(small_root) if r["accessories"] == "1"}
  assert not any(r.path.rsplit("/", 1)[1] in accessory_images for s in splits.values() for r in s)
  assert max(r.pid for r in gallery) > 11_000_000  # the other aspects' galleries join as distractors
  assert {r.pid for r in query} <= {r.pid for r in gallery}
  assert 1_200_000 not in {r.pid for r in train}  # the padded id sorts last: a test id


def test_generation_is_deterministic_and_reused(small_root, tmp_path):
  digest = lambda root: sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in root.rglob("*.jpg"))
  again = demo_hands.generate_demo_hands(tmp_path / "again", **SMALL)
  assert digest(again) == digest(small_root)
  stamp = (again / demo_hands.MARKER).stat().st_mtime_ns
  demo_hands.generate_demo_hands(again, **SMALL)
  assert (again / demo_hands.MARKER).stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match="max_images"):
    demo_hands.generate_demo_hands(tmp_path / "bad", **dict(SMALL, max_images=1))


def test_refuses_to_overwrite_a_real_11k_folder(tmp_path):
  (tmp_path / "HandInfo.csv").write_text("id,accessories,aspectOfHand,imageName\n")
  with pytest.raises(FileExistsError, match="did not write"):
    demo_hands.generate_demo_hands(tmp_path, **SMALL)


# --- the label bug: labels assigned before the validation image was held out ------------------------------

def test_single_image_identity_keeps_it_for_training():
  train_all = [Record(f"/h/{pid}_{i}.jpg", pid, -1) for pid, n in ((3, 4), (5, 1), (9, 2)) for i in range(n)]
  train, val = common.hold_out_val(train_all, seed=0, key=0)
  num_classes = len({r.label for r in train})
  assert num_classes == 3 and sorted({r.label for r in train}) == [0, 1, 2]
  assert {r.pid for r in val} == {3, 9} and all(r.label < num_classes for r in val)
  assert [r.path for r in train if r.pid == 5] == ["/h/5_0.jpg"]
  common.check_labels({"train": train, "val": val}, "test")


def test_label_check_refuses_a_label_beyond_the_classes():
  train = [Record("/h/a.jpg", 3, -1, 0), Record("/h/b.jpg", 9, -1, 1)]
  with pytest.raises(ValueError, match=r"val image /h/c.jpg has label 2, but its identity 5 has no training"):
    common.check_labels({"train": train, "val": [Record("/h/c.jpg", 5, -1, 2)]}, "test")
  with pytest.raises(ValueError, match=r"train labels must be 0..1"):
    common.check_labels({"train": [Record("/h/a.jpg", 3, -1, 0), Record("/h/b.jpg", 9, -1, 2)]}, "test")
