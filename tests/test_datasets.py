"""Dataset parsers: SPEC's split counts from the real file lists, split rules, extraction and error messages.

Real file lists (shared/realdata) become trees of empty placeholder files (the real sample images are
linked in at their places), so every count is checked without the datasets themselves.
"""

import csv
import logging
import os
import pathlib

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_pipelines import datasets
from data_pipelines.datasets import cuhk03

ASPECTS = ("11k_dorsal_right", "11k_dorsal_left", "11k_palmar_right", "11k_palmar_left")


# ---------------------------------------------------------------------------------------------- tree helpers


def make_tree(root: pathlib.Path, relative_paths, real_images=None) -> None:
  """Empty files at `relative_paths` under `root`; names in `real_images` become links to real images."""
  real_images = real_images or {}
  folders = {os.path.dirname(p) for p in relative_paths}
  for folder in folders:
    (root / folder).mkdir(parents=True, exist_ok=True)
  source, links = None, 0
  for i, rel in enumerate(relative_paths):
    target = root / rel
    if rel in real_images:
      os.symlink(real_images[rel], target)
      continue
    # Hard links to one empty file are much faster than creating files; ext4 allows 65,000 per inode.
    if source is None or links == 60_000:
      source, links = root / f".placeholder{i}", 0
      source.touch()
    try:
      os.link(source, target)
    except OSError:
      target.touch()
    links += 1


def read_triplet_csv(path: pathlib.Path) -> list[str]:
  with open(path) as f:
    return [line.strip().split(",")[1] for line in f if line.strip()]


def real_images_under(folder: pathlib.Path) -> dict:
  """{path relative to `folder`: absolute path} of the real sample images in `folder`."""
  return {str(p.relative_to(folder)): str(p) for p in folder.rglob("*.jpg")}


def id_image_counts(records) -> tuple[int, int]:
  return len({r.pid for r in records}), len(records)


def decode_real(records, realdata_dir: pathlib.Path) -> int:
  """Decodes every record that is one of the real sample images (linked in) and returns how many there were."""
  names = {p.name for p in realdata_dir.rglob("*.jpg")}
  real = [r for r in records if os.path.basename(r.path) in names]
  for r in real:
    assert os.path.islink(r.path)
    with Image.open(r.path) as image:
      image.load()
      assert image.size[0] > 0 and image.mode == "RGB"
  return len(real)


def assert_train_labels(train) -> None:
  pids = sorted({r.pid for r in train})
  assert {r.label for r in train} == set(range(len(pids)))
  assert all(r.label == pids.index(r.pid) for r in train[:: max(1, len(train) // 200)])


# ---------------------------------------------------------------------------------------------- real-list trees


@pytest.fixture(scope="session")
def market_root(realdata_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("Market-1501-v15.09.15")
  lists = realdata_dir / "market1501" / "triplet-reid_lists"
  paths = [p for split in ("train", "query", "test") for p in read_triplet_csv(lists / f"market1501_{split}.csv")]
  make_tree(root, paths, real_images_under(realdata_dir / "market1501" / "images"))
  return root


@pytest.fixture(scope="session")
def duke_root(realdata_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("DukeMTMC-reID")
  lists = realdata_dir / "duke" / "triplet-reid_lists"
  paths = [p for split in ("train", "query", "test") for p in read_triplet_csv(lists / f"dukeMTMC_{split}.csv")]
  make_tree(root, paths, real_images_under(realdata_dir / "duke" / "images"))
  return root


@pytest.fixture(scope="session")
def msmt_root(realdata_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("MSMT17_V1")
  source = realdata_dir / "msmt17"
  paths = []
  for name, folder in (("train", "train"), ("val", "train"), ("query", "test"), ("gallery", "test")):
    os.symlink(source / f"list_{name}.txt", root / f"list_{name}.txt")
    with open(source / f"list_{name}.txt") as f:
      paths += [f"{folder}/{line.split()[0]}" for line in f if line.strip()]
  make_tree(root, paths, real_images_under(source / "images"))
  return root


@pytest.fixture(scope="session")
def cuhk03_root(realdata_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("cuhk03")
  for variant in cuhk03.VARIANTS:
    config = realdata_dir / "cuhk03" / f"cuhk03_new_protocol_config_{variant}.mat"
    os.symlink(config, root / config.name)
    names = [str(np.ravel(c)[0]) for c in np.ravel(scipy.io.loadmat(config)["filelist"])]
    make_tree(root, [f"images_{variant}/{n}" for n in names])
  return root


@pytest.fixture(scope="session")
def hands_root(realdata_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("11k")
  os.symlink(realdata_dir / "11k" / "HandInfo.csv", root / "HandInfo.csv")
  with open(realdata_dir / "11k" / "HandInfo.csv", newline="") as f:
    names = [row["imageName"] for row in csv.DictReader(f)]
  real = {f"Hands/{p.name}": str(p) for p in (realdata_dir / "11k" / "Hands_resized180").glob("*.jpg")}
  make_tree(root, [f"Hands/{n}" for n in names], real)
  return root


# ---------------------------------------------------------------------------------------------- body counts

BODY_TABLE = {
    # name: (fixture, {split: (ids, images)}, cameras, real images linked in)
    "market1501": ("market_root", {"train": (751, 12936), "query": (750, 3368), "gallery": (751, 15913)}, 6, 48),
    "dukemtmc": ("duke_root", {"train": (702, 16522), "query": (702, 2228), "gallery": (1110, 17661)}, 8, 17),
    "msmt17": ("msmt_root", {"train": (1041, 30248), "query": (3060, 11659), "gallery": (3060, 82161)}, 15, 15),
    "cuhk03_labeled": ("cuhk03_root", {"train": (767, 7368), "query": (700, 1400), "gallery": (700, 5328)}, 2, 0),
    "cuhk03_detected": ("cuhk03_root", {"train": (767, 7365), "query": (700, 1400), "gallery": (700, 5332)}, 2,
                        0),
}


@pytest.fixture(scope="session")
def body_splits(request):
  """Loads a body dataset's placeholder tree once per session (the trees hold up to 126k files)."""
  cache = {}

  def load(name):
    if name not in cache:
      cache[name] = datasets.load_splits(name, request.getfixturevalue(BODY_TABLE[name][0]))
    return cache[name]
  return load


@pytest.mark.parametrize("name", list(BODY_TABLE))
def test_body_counts_match_spec(name, request, realdata_dir, caplog):
  fixture, table, num_cams, num_real = BODY_TABLE[name]
  with caplog.at_level(logging.WARNING):
    splits = request.getfixturevalue("body_splits")(name)
  assert not caplog.records, "the count check warned on a complete tree"
  assert set(splits) == {"train", "query", "gallery"}
  for split, expected in table.items():
    assert id_image_counts(splits[split]) == expected, split
  records = [r for split in splits.values() for r in split]
  assert {r.camid for r in records} == set(range(1, num_cams + 1))
  assert all(r.pid >= 0 for r in records), "junk (-1) must be dropped"
  assert all(os.path.isabs(r.path) and os.path.exists(r.path) for r in records[::97])
  assert_train_labels(splits["train"])
  assert all(r.label == -1 for r in splits["query"] + splits["gallery"])
  assert decode_real(records, realdata_dir) == num_real
  if name == "market1501":
    assert sum(r.pid == 0 for r in splits["gallery"]) == 2798  # the 0000 distractors stay (as pid 0)


def test_market_pid_and_camera_come_from_the_file_name(body_splits):
  splits = body_splits("market1501")
  first = splits["train"][0]
  assert os.path.basename(first.path) == "0002_c1s1_000451_03.jpg"
  assert (first.pid, first.camid, first.label) == (2, 1, 0)


def test_msmt17_merge_val_adds_list_val(msmt_root, body_splits):
  default = body_splits("msmt17")
  merged = datasets.load_splits("msmt17", msmt_root, merge_val=True)
  assert id_image_counts(merged["train"]) == (1041, 32621)
  assert id_image_counts(default["train"]) == (1041, 30248)
  assert_train_labels(merged["train"])
  ex = [r for r in merged["train"] if r.path.endswith("_ex.jpg")]
  assert ex and ex[0].camid == int(os.path.basename(ex[0].path).split("_")[2])


def test_cuhk03_protocol_sets(body_splits):
  for variant in cuhk03.VARIANTS:
    splits = body_splits(f"cuhk03_{variant}")
    train_ids = {r.pid for r in splits["train"]}
    query_ids = {r.pid for r in splits["query"]}
    assert not train_ids & query_ids
    assert query_ids == {r.pid for r in splits["gallery"]}
    paths = [r.path for s in splits.values() for r in s]
    assert len(set(paths)) == len(paths)
    assert all(f"images_{variant}" in p for p in paths[::50])
    for r in splits["query"][:50]:  # camera 1 = image slots 1-5, camera 2 = slots 6-10
      assert (int(os.path.basename(r.path)[8:10]) <= 5) == (r.camid == 1)


# ---------------------------------------------------------------------------------------------- 11k hands

HAND_TABLE = {  # train incl. val (ids, images), query (ids, images)
    "11k_dorsal_right": ((72, 962), (71, 971)),
    "11k_dorsal_left": ((73, 808), (73, 988)),
    "11k_palmar_right": ((72, 977), (71, 917)),
    "11k_palmar_left": ((76, 1004), (75, 948)),
}


@pytest.mark.parametrize("name", ASPECTS)
def test_11k_counts_match_spec(name, hands_root, realdata_dir, caplog):
  (train_ids, train_images), query = HAND_TABLE[name]
  with caplog.at_level(logging.WARNING):
    splits = datasets.load_splits(name, hands_root)
  assert not caplog.records
  train, val = splits["train"], splits["val"]
  assert id_image_counts(train + val) == (train_ids, train_images)
  assert id_image_counts(val) == (train_ids, train_ids), "one val image per train id"
  assert not {r.path for r in val} & {r.path for r in train}, "val images are excluded from train"
  assert_train_labels(train)  # every train id keeps at least one training image
  train_labels = {r.pid: r.label for r in train}
  assert all(train_labels[r.pid] == r.label for r in val), "val uses the train labels"
  assert id_image_counts(splits["query"]) == query
  gallery = splits["gallery"]
  assert id_image_counts(gallery) == (290, 290)
  own = [r for r in gallery if r.pid < 11_000_000]
  assert sorted(r.pid for r in own) == sorted({r.pid for r in splits["query"]}), "one own gallery image per test id"
  assert not {r.path for r in gallery} & {r.path for r in splits["query"]}
  assert {r.camid for s in splits.values() for r in s} == {-1}
  assert max(r.pid for r in train) < min(r.pid for r in splits["query"])
  # Per aspect the sample holds 10 train-side and 10 test-side images without accessories.
  assert decode_real(train + val + splits["query"] + own, realdata_dir) == 20


def test_11k_strips_the_padded_id(hands_root):
  splits = datasets.load_splits("11k_dorsal_right", hands_root)
  test = splits["query"] + [r for r in splits["gallery"] if r.pid < 11_000_000]
  assert any(r.pid == 1_200_000 and r.path.endswith("Hand_0009853.jpg") for r in test)


def test_11k_draws_are_seeded_and_share_one_gallery(hands_root):
  load = lambda name, **kw: datasets.load_splits(name, hands_root, **kw)
  d0, d0_again, d1 = load("11k_dorsal_right", draw=0), load("11k_dorsal_right"), load("11k_dorsal_right", draw=1)
  assert d0 == d0_again
  assert {r.path for r in d0["gallery"]} != {r.path for r in d1["gallery"]}
  assert d0["train"] == d1["train"] and d0["val"] == d1["val"], "val must not depend on the draw"
  reseeded = load("11k_dorsal_right", seed=1)
  assert {r.path for r in reseeded["val"]} != {r.path for r in d0["val"]}
  # Every aspect's query set of draw 3 meets the same 290 images; the owner keeps raw ids.
  galleries = {name: load(name, draw=3)["gallery"] for name in ASPECTS}
  paths = {name: sorted(r.path for r in g) for name, g in galleries.items()}
  assert all(p == paths["11k_dorsal_right"] for p in paths.values())
  left_own = {r.path: r.pid for r in galleries["11k_dorsal_left"] if r.pid < 11_000_000}
  left_in_right = {r.path: r.pid for r in galleries["11k_dorsal_right"] if r.path in left_own}
  assert left_in_right == {p: pid + 11_000_000 for p, pid in left_own.items()}
  own_only = load("11k_palmar_left", draw=3, combined_gallery=False)
  assert id_image_counts(own_only["gallery"]) == (75, 75)


def test_11k_edited_handinfo_changes_dorsal_left(hands_root, realdata_dir, caplog):
  edited = realdata_dir / "11k" / "variants" / "HandInfo.katxchen_edited_row7558.csv"
  with caplog.at_level(logging.WARNING):
    splits = datasets.load_splits("11k_dorsal_left", hands_root, info_file=str(edited))
  assert len(splits["train"] + splits["val"]) == 809
  assert "11k_dorsal_left train" in caplog.text and "808" in caplog.text


def test_11k_missing_image_is_named(hands_root, tmp_path):
  os.symlink(hands_root / "HandInfo.csv", tmp_path / "HandInfo.csv")
  (tmp_path / "Hands").mkdir()
  with pytest.raises(FileNotFoundError, match=r"Hands/Hand_\d{7}\.jpg"):
    datasets.load_splits("11k_palmar_right", tmp_path)


# ---------------------------------------------------------------------------------------------- HD (synthetic)


@pytest.fixture(scope="module")
def hd_root(tmp_path_factory):
  """An HD tree with Table II's numbers: 251 train ids <= 447, 251 test ids, 213 extra subjects."""
  root = tmp_path_factory.mktemp("HD")
  rng = np.random.default_rng(0)
  train_ids = np.sort(rng.choice(np.arange(1, 448), 251, replace=False))
  test_ids = np.arange(448, 448 + 251)
  per_train = [10] * 148 + [9] * 103            # 2,407 images
  per_test = [9] * 235 + [8] * 16               # 2,243 = 1,992 query + 251 gallery
  per_extra = [7] * 64 + [6] * 149              # 1,342 images
  paths = []
  for ids, per_id, folder in ((train_ids, per_train, "1-501"), (test_ids, per_test, "1-501"),
                              (np.arange(502, 715), per_extra, "502-712")):
    for pid, n in zip(ids, per_id):
      paths += [f"Original Images/{folder}/{pid}_{k}.{'JPG' if k == 1 else 'jpg'}" for k in range(1, n + 1)]
  make_tree(root, paths)
  return root


def test_hd_split_rule_reproduces_table_ii(hd_root, caplog):
  with caplog.at_level(logging.WARNING):
    splits = datasets.load_splits("hd", hd_root)
  assert not caplog.records
  train, val, query, gallery = (splits[k] for k in ("train", "val", "query", "gallery"))
  assert id_image_counts(train + val) == (251, 2407)
  assert id_image_counts(val) == (251, 251)
  assert id_image_counts(query) == (251, 1992)
  assert id_image_counts(gallery) == (464, 1593)
  assert max(r.pid for r in train) <= 447 < min(r.pid for r in query)
  extra = [r for r in gallery if "502-712" in r.path]
  assert len(extra) == 1342 and all(r.pid == int(os.path.basename(r.path).split("_")[0]) + 1000 for r in extra)
  assert any(r.path.endswith(".JPG") for r in train), "the extension check is case-insensitive"
  other = datasets.load_splits("hd", hd_root, draw=4)
  assert other["val"] == val and {r.path for r in other["gallery"]} != {r.path for r in gallery}
  assert datasets.load_splits("hd", hd_root, draw=4) == other


# ---------------------------------------------------------------------------------------------- CUHK03 extraction

MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 ."


def write_cuhk03_mat(path: pathlib.Path, cells: dict) -> None:
  """A MATLAB v7.3 file like the original cuhk-03.mat: `cells[variant][pair][person][slot]` = image or None.

  As MATLAB writes it: every array transposed (an H x W x 3 image is a 3 x W x H dataset), cells are
  datasets of object references into `#refs#`, empty cells are dims vectors flagged MATLAB_empty.
  """
  with h5py.File(path, "w", userblock_size=512) as f:
    refs = f.create_group("#refs#")

    def put(data, matlab_class, empty=False):
      ds = refs.create_dataset(f"r{len(refs)}", data=data)
      ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
      if empty:
        ds.attrs["MATLAB_empty"] = np.uint8(1)
      return ds.ref

    for variant, pairs in cells.items():
      pair_refs = []
      for persons in pairs:
        grid = np.empty((len(persons), 10), dtype=h5py.ref_dtype)
        for i, slots in enumerate(persons):
          for j, image in enumerate(slots):
            grid[i, j] = (put(np.zeros(2, np.uint64), "double", empty=True) if image is None
                          else put(image.T, "uint8"))
        pair_refs.append(put(grid.T, "cell"))
      top = f.create_dataset(variant, data=np.array([pair_refs], dtype=h5py.ref_dtype))
      top.attrs["MATLAB_class"] = np.bytes_("cell")
  with open(path, "r+b") as f:
    f.write(MATLAB_HEADER)


def write_protocol(path: pathlib.Path, names, pids, splits) -> None:
  filelist = np.empty((len(names), 1), dtype=object)
  for i, name in enumerate(names):
    filelist[i, 0] = np.array([name])
  column = lambda values, dtype: np.asarray(values, dtype).reshape(-1, 1)
  scipy.io.savemat(path, {
      "filelist": filelist, "labels": column(pids, np.uint16),
      "camId": column([1 if int(n[8:10]) <= 5 else 2 for n in names], np.uint8),
      **{f"{k}_idx": column(np.asarray(v) + 1, np.uint16) for k, v in splits.items()}})


@pytest.fixture()
def cuhk03_raw(tmp_path):
  """Two camera pairs (3 and 2 persons) with empty slots and non-square images; configs for both variants."""
  rng = np.random.default_rng(0)
  cells, expected = {}, {}
  for variant in cuhk03.VARIANTS:
    pairs = []
    for pair, num_persons in enumerate((3, 2), start=1):
      persons = []
      for person in range(1, num_persons + 1):
        slots = []
        for slot in range(1, 11):
          empty = (pair, person, slot) in {(1, 2, 5), (1, 3, 2), (2, 1, 3), (2, 1, 4)}
          image = None if empty else rng.integers(0, 256, (12 + person, 5 + slot, 3), dtype=np.uint8)
          slots.append(image)
          if image is not None:
            expected[(variant, cuhk03.image_name(pair, person, slot))] = image
        persons.append(slots)
      pairs.append(persons)
    cells[variant] = pairs
  (tmp_path / "cuhk03_release").mkdir()
  write_cuhk03_mat(tmp_path / "cuhk03_release" / "cuhk-03.mat", cells)
  for variant in cuhk03.VARIANTS:
    names = sorted(n for v, n in expected if v == variant)
    pid_of = {(1, 1): 1, (1, 2): 2, (1, 3): 3, (2, 1): 4, (2, 2): 5}
    pids = [pid_of[(int(n[0]), int(n[2:5]))] for n in names]
    train = [i for i, p in enumerate(pids) if p <= 2]
    test = [i for i, p in enumerate(pids) if p > 2]
    query = [i for i in test if int(names[i][8:10]) in (1, 6)]
    gallery = [i for i in test if i not in query]
    write_protocol(tmp_path / f"cuhk03_new_protocol_config_{variant}.mat", names, pids,
                   {"train": train, "query": query, "gallery": gallery})
  return tmp_path, expected


def test_cuhk03_extracts_images_from_the_v73_mat(cuhk03_raw):
  root, expected = cuhk03_raw
  assert open(root / "cuhk03_release" / "cuhk-03.mat", "rb").read(10) == b"MATLAB 7.3"
  for variant in cuhk03.VARIANTS:
    splits = datasets.load_splits(f"cuhk03_{variant}", root)
    written = sorted(p.name for p in (root / f"images_{variant}").iterdir())
    wanted = sorted(n for v, n in expected if v == variant)
    assert written == wanted and len(wanted) == 46   # 50 slots minus 4 empty cells
    assert "1_002_1_05.png" not in written and "1_001_2_06.png" in written
    for record in splits["train"] + splits["query"] + splits["gallery"]:
      name = os.path.basename(record.path)
      np.testing.assert_array_equal(np.asarray(Image.open(record.path)), expected[(variant, name)])
      assert record.camid == (1 if int(name[8:10]) <= 5 else 2)
    assert {r.pid for r in splits["train"]} == {1, 2} and {r.label for r in splits["train"]} == {0, 1}
    assert {r.pid for r in splits["query"]} == {r.pid for r in splits["gallery"]} == {3, 4, 5}
  # Once extracted, the raw file is no longer needed.
  (root / "cuhk03_release" / "cuhk-03.mat").unlink()
  assert len(datasets.load_splits("cuhk03_labeled", root)["train"]) == 19


def test_cuhk03_extract_into_another_folder(cuhk03_raw, tmp_path_factory):
  root, _ = cuhk03_raw
  out = tmp_path_factory.mktemp("pngs")
  splits = datasets.load_splits("cuhk03_detected", root, images_dir=str(out))
  assert all(r.path.startswith(str(out)) for r in splits["train"])
  assert not (root / "images_detected").exists()


def test_cuhk03_bad_inputs(cuhk03_raw):
  root, _ = cuhk03_raw
  mat = root / "cuhk03_release" / "cuhk-03.mat"
  mat.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
  with pytest.raises(ValueError, match=r"cuhk-03\.mat is not a MATLAB v7\.3 \(HDF5\) file"):
    datasets.load_splits("cuhk03_labeled", root)
  mat.unlink()
  with pytest.raises(FileNotFoundError, match=r"cuhk03_release/cuhk-03\.mat[\s\S]*Expected layout"):
    datasets.load_splits("cuhk03_labeled", root)
  config = root / "cuhk03_new_protocol_config_detected.mat"
  content = scipy.io.loadmat(config)
  content["train_idx"] = content["train_idx"] - 1  # 0-based: the first file gets index 0
  scipy.io.savemat(config, {k: v for k, v in content.items() if not k.startswith("__")})
  with pytest.raises(ValueError, match=r"train_idx must hold 1-based indices in 1..46, got 0\.\."):
    datasets.load_splits("cuhk03_detected", root)
  write_cuhk03_mat(config, {"detected": []})  # a v7.3 file where the v5 protocol config belongs
  with pytest.raises(ValueError, match=r"cannot read .*config_detected\.mat .*expected a MATLAB v5 \.mat file"):
    datasets.load_splits("cuhk03_detected", root)


# ---------------------------------------------------------------------------------------------- custom data


def save_jpeg(path: pathlib.Path, colour=(200, 30, 30)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (16, 32), colour).save(path)


def test_custom_folder_tree(tmp_path, caplog):
  for rel in ("train/7/a_c1.jpg", "train/7/b_c2.jpg", "train/3/x.png", "val/3/y.jpg", "query/12/q_c2.jpg",
              "gallery/12/g_c1.jpg", "gallery/0/distractor_c3.jpg"):
    save_jpeg(tmp_path / rel)
  (tmp_path / "train" / "7" / "notes.txt").write_text("ignored")
  with caplog.at_level(logging.WARNING):
    splits = datasets.load_splits("custom", tmp_path, verify_images=True)
  assert not caplog.records
  as_tuples = lambda records: sorted((os.path.relpath(r.path, tmp_path), r.pid, r.camid, r.label) for r in records)
  assert as_tuples(splits["train"]) == [("train/3/x.png", 3, 0, 0), ("train/7/a_c1.jpg", 7, 1, 1),
                                        ("train/7/b_c2.jpg", 7, 2, 1)]
  assert as_tuples(splits["val"]) == [("val/3/y.jpg", 3, 0, 0)]
  assert as_tuples(splits["gallery"]) == [("gallery/0/distractor_c3.jpg", 0, 3, -1), ("gallery/12/g_c1.jpg", 12, 1, -1)]


def test_custom_without_cameras_warns(tmp_path, caplog):
  for rel in ("train/1/a.jpg", "query/2/b.jpg", "gallery/2/c.jpg"):
    save_jpeg(tmp_path / rel)
  with caplog.at_level(logging.WARNING):
    datasets.load_splits("custom", tmp_path)
  assert "same-identity same-camera" in caplog.text


def test_custom_csv_manifest(tmp_path):
  for rel in ("imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg"):
    save_jpeg(tmp_path / rel)
  elsewhere = tmp_path / "elsewhere" / "d.jpg"
  save_jpeg(elsewhere)
  manifest = tmp_path / "data.csv"
  manifest.write_text(f"path,pid,camid,split,note\nimgs/a.jpg,5,1,train,x\nimgs/b.jpg,9,,train,\n"
                      f"imgs/c.jpg,9,2,query,\n{elsewhere},9,3,gallery,\n")
  splits = datasets.load_splits("custom", manifest)
  assert [(r.pid, r.camid, r.label) for r in splits["train"]] == [(5, 1, 0), (9, 0, 1)]
  assert splits["gallery"][0].path == str(elsewhere)
  assert splits["query"][0].path == str(tmp_path / "imgs" / "c.jpg")


@pytest.mark.parametrize("row, message", [
    ("imgs/a.jpg,5,1,test", r"line 3: split 'test' is not one of \['train', 'val', 'query', 'gallery'\]"),
    ("imgs/a.jpg,bob,1,query", r"line 3: identity 'bob' is not a non-negative integer"),
    ("imgs/missing.jpg,5,1,query", r"line 3: image .*imgs/missing\.jpg does not exist"),
    ("imgs/a.jpg,5,c1,query", r"line 3: camid 'c1' is not an integer"),
])
def test_custom_manifest_errors_name_the_row(tmp_path, row, message):
  save_jpeg(tmp_path / "imgs" / "a.jpg")
  manifest = tmp_path / "m.csv"
  manifest.write_text(f"path,pid,camid,split\nimgs/a.jpg,1,1,train\n{row}\n")
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    datasets.load_splits("custom", manifest)


@pytest.mark.parametrize("files, error, message", [
    (("train/alice/a.jpg",), ValueError, r"folder .*train/alice: identity 'alice' is not a non-negative integer"),
    (("train/a.jpg",), ValueError, r"image .*train/a\.jpg lies directly in .*train; expected train/<pid>/<image>"),
    (("train/1/a.jpg",), FileNotFoundError, r"custom: folder not found: .*/query\n[\s\S]*train/<pid>/<image>"),
    (("train/1/a.jpg", "query/1/b.jpg", "gallery/readme.txt"), ValueError, r"has no gallery images"),
    (("train/1/a.jpg", "val/2/v.jpg", "query/1/b.jpg", "gallery/1/c.jpg"), ValueError,
     r"val identities \[2\] have no train images"),
])
def test_custom_folder_errors(tmp_path, files, error, message):
  for rel in files:
    if rel.endswith(".jpg"):
      save_jpeg(tmp_path / rel)
    else:
      (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / rel).write_text("not an image")
  with pytest.raises(error, match=message):
    datasets.load_splits("custom", tmp_path)


def test_verify_images_names_the_broken_file(tmp_path):
  for rel in ("train/1/a_c1.jpg", "query/1/b_c2.jpg"):
    save_jpeg(tmp_path / rel)
  broken = tmp_path / "gallery" / "1" / "c_c1.jpg"
  broken.parent.mkdir(parents=True)
  broken.write_bytes(b"\xff\xd8 truncated")
  assert datasets.load_splits("custom", tmp_path)["gallery"][0].path == str(broken)
  with pytest.raises(ValueError, match=r"1 image\(s\) cannot be decoded:\n  .*gallery/1/c_c1\.jpg"):
    datasets.load_splits("custom", tmp_path, verify_images=True)


# ---------------------------------------------------------------------------------------------- demo and errors


def test_demo_generates_on_first_use(tmp_path):
  root = tmp_path / "demo"
  splits = datasets.load_splits("demo", root)
  assert (root / "demo_dataset.json").is_file()
  assert all(splits[k] for k in ("train", "query", "gallery"))
  assert_train_labels(splits["train"])
  assert all(r.pid >= 0 for s in splits.values() for r in s)
  marker_time = (root / "demo_dataset.json").stat().st_mtime_ns
  assert datasets.load_splits("demo", root) == splits
  assert (root / "demo_dataset.json").stat().st_mtime_ns == marker_time


def test_registry_metadata_and_name_errors():
  assert list(datasets.DATASETS) == ["market1501", "dukemtmc", "cuhk03_labeled", "cuhk03_detected", "msmt17",
                                     *ASPECTS, "hd", "custom", "demo", "demo_b", "demo_hands"]
  for name, info in datasets.DATASETS.items():
    assert info.name == name and info.kind == ("hand" if name.startswith("11k") or name in ("hd", "demo_hands")
                                               else "body")
    assert info.description and info.layout and info.folder
  with pytest.raises(ValueError, match=r"unknown dataset 'market'.*did you mean 'market1501'.*valid names: "
                                       r"market1501, dukemtmc"):
    datasets.get_dataset_info("market")


def test_option_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'msmt17': unknown option 'merge'; valid options: merge_val, verify_images"):
    datasets.load_splits("msmt17", tmp_path, merge=True)
  with pytest.raises(ValueError, match=r"option draw='3' \(str\): expected an integer"):
    datasets.load_splits("11k_dorsal_left", tmp_path, draw="3")
  with pytest.raises(ValueError, match=r"option merge_val=1 \(int\): expected True or False"):
    datasets.load_splits("msmt17", tmp_path, merge_val=1)
  with pytest.raises(ValueError, match=r"non-negative, got draw=-1"):
    datasets.load_splits("hd", tmp_path, draw=-1)
  with pytest.raises(ValueError, match=r"no dataset root given"):
    datasets.load_splits("market1501", "")


def test_missing_folder_shows_the_expected_layout(tmp_path):
  (tmp_path / "Market-1501-v15.09.15" / "bounding_box_train").mkdir(parents=True)
  with pytest.raises(FileNotFoundError) as error:
    datasets.load_splits("market1501", tmp_path)
  message = str(error.value)
  assert f"folder not found: {tmp_path}/bounding_box_train" in message
  assert "bounding_box_test/" in message and "zheng-lab" in message
  assert f"Did you mean root={tmp_path / 'Market-1501-v15.09.15'}?" in message
  with pytest.raises(FileNotFoundError, match=r"hd: folder not found: .*Original Images/1-501[\s\S]*knuckle"):
    datasets.load_splits("hd", tmp_path)


def test_unknown_file_name_pattern_is_named(tmp_path):
  for folder in ("bounding_box_train", "query", "bounding_box_test"):
    (tmp_path / folder).mkdir()
  (tmp_path / "bounding_box_test" / "Thumbs.db").touch()  # non-images are ignored
  (tmp_path / "query" / "0001_c1_f0046182.jpg").touch()   # a Duke name in a Market tree
  with pytest.raises(ValueError, match=r"unexpected file name .*query/0001_c1_f0046182\.jpg: expected names like "
                                       r"'0002_c1s1_000451_03\.jpg'"):
    datasets.load_splits("market1501", tmp_path)


def test_corrupt_list_files_are_named(tmp_path):
  for folder in ("train", "test"):
    (tmp_path / folder).mkdir()
  for name in ("train", "query", "gallery"):
    (tmp_path / f"list_{name}.txt").write_text("")
  (tmp_path / "list_query.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n0000/broken.jpg\n")
  with pytest.raises(ValueError, match=r"list_query\.txt, line 2: expected a line like"):
    datasets.load_splits("msmt17", tmp_path)
  (tmp_path / "list_query.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n")
  with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*list_query\.txt do not exist:\n  "
                                              r".*test/0000/0000_000_01_0303morning_0015_0\.jpg"):
    datasets.load_splits("msmt17", tmp_path)
  hand_info = tmp_path / "HandInfo.csv"
  hand_info.write_text('id,age,aspectOfHand,imageName\n"0000000",27,"dorsal right","Hand_0000002.jpg"\n')
  (tmp_path / "Hands").mkdir()
  with pytest.raises(ValueError, match=r"HandInfo\.csv lacks the column\(s\) \['accessories'\]"):
    datasets.load_splits("11k_dorsal_right", tmp_path)
  hand_info.write_text('id,accessories,aspectOfHand,imageName\n"00x0",0,"dorsal right","Hand_0000002.jpg"\n')
  with pytest.raises(ValueError, match=r"HandInfo\.csv, line 2: expected an integer id"):
    datasets.load_splits("11k_dorsal_right", tmp_path)


def test_count_check_warns_on_an_incomplete_download(realdata_dir, tmp_path, caplog):
  """A Market tree holding only the real sample images: parsed, decoded, and flagged as incomplete."""
  for folder in ("bounding_box_train", "query"):
    (tmp_path / folder).mkdir()
    for image in (realdata_dir / "market1501" / "images" / folder).glob("*.jpg"):
      os.symlink(image, tmp_path / folder / image.name)
  (tmp_path / "bounding_box_test").mkdir()
  with caplog.at_level(logging.WARNING):
    splits = datasets.load_splits("market1501", tmp_path, verify_images=True)
  assert id_image_counts(splits["train"])[1] == 18 and id_image_counts(splits["query"])[1] == 30
  assert "market1501 train: " in caplog.text and "expected 751 ids / 12936 images" in caplog.text


def test_msmt17_v2_folders_are_accepted(tmp_path):
  lines = {"train": "0000/0000_045_12_0303morning_0006_2.jpg 0", "val": "0000/0000_046_12_0303morning_0006_2_ex.jpg 0",
           "query": "0007/0007_000_01_0303noon_0015_0.jpg 7", "gallery": "0007/0007_019_05_0303noon_0029_1.jpg 7"}
  for split, line in lines.items():
    (tmp_path / f"list_{split}.txt").write_text(line + "\n")
    folder = "mask_train_v2" if split in ("train", "val") else "mask_test_v2"
    make_tree(tmp_path, [f"{folder}/{line.split()[0]}"])
  splits = datasets.load_splits("msmt17", tmp_path, merge_val=True)
  assert [(os.path.relpath(r.path, tmp_path), r.pid, r.camid, r.label) for r in splits["train"]] == [
      ("mask_train_v2/0000/0000_045_12_0303morning_0006_2.jpg", 0, 12, 0),
      ("mask_train_v2/0000/0000_046_12_0303morning_0006_2_ex.jpg", 0, 12, 0)]
  assert (splits["query"][0].pid, splits["query"][0].camid) == (7, 1)


# ---------------------------------------------------------------------------------------------- evaluation only


def test_eval_only_reads_test_only_copies(tmp_path, caplog):
  """Copies holding only query and gallery (Market layout, custom tree and manifest, MSMT17 V1) parse with
  `eval_only=True` into exactly those two splits, with no count warning about the missing train split; without
  it the missing training part is named."""
  market = tmp_path / "market"
  make_tree(market, ["query/0001_c1s1_001051_00.jpg", "query/0003_c2s1_000301_01.jpg",
                     "bounding_box_test/0001_c2s1_000151_01.jpg", "bounding_box_test/0000_c3s1_000151_01.jpg",
                     "bounding_box_test/-1_c1s1_000401_03.jpg"])
  custom = tmp_path / "custom"
  for rel in ("query/12/q_c2.jpg", "gallery/12/g_c1.jpg", "gallery/0/distractor_c3.jpg"):
    save_jpeg(custom / rel)
  manifest = tmp_path / "test_only.csv"
  manifest.write_text("path,pid,camid,split\ncustom/query/12/q_c2.jpg,12,2,query\n"
                      "custom/gallery/12/g_c1.jpg,12,1,gallery\nnot/here.jpg,4,1,train\n")
  msmt = tmp_path / "msmt"
  for split, line in (("query", "0007/0007_000_01_0303noon_0015_0.jpg 7"),
                      ("gallery", "0007/0007_019_05_0303noon_0029_1.jpg 7")):
    (msmt / "test").mkdir(parents=True, exist_ok=True)
    (msmt / f"list_{split}.txt").write_text(line + "\n")
    make_tree(msmt, [f"test/{line.split()[0]}"])
  cases = {"market1501": (market, (2, 2), (2, 2), "bounding_box_train"),
           "custom": (custom, (1, 1), (2, 2), "train"), "msmt17": (msmt, (1, 1), (1, 1), "train")}
  for name, (root, query, gallery, missing) in cases.items():
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      splits = datasets.load_splits(name, root, eval_only=True)
    assert set(splits) == {"query", "gallery"}, name
    assert id_image_counts(splits["query"]) == query and id_image_counts(splits["gallery"]) == gallery, name
    assert not [r for r in caplog.records if "train" in r.getMessage()], name
    with pytest.raises(FileNotFoundError, match=rf"folder not found: {root / missing}\n"):
      datasets.load_splits(name, root)
  # The manifest's train rows are not read, so their missing image is no error.
  splits = datasets.load_splits("custom", manifest, eval_only=True)
  assert set(splits) == {"query", "gallery"} and splits["query"][0].pid == 12
  with pytest.raises(FileNotFoundError, match=r"line 4: image .*not/here\.jpg does not exist"):
    datasets.load_splits("custom", manifest)


def test_eval_only_equals_the_full_parse_on_real_lists(market_root, body_splits, hands_root, hd_root, caplog):
  """On complete trees, evaluation-only parsing gives the full parse's query and gallery, with no warning."""
  with caplog.at_level(logging.WARNING):
    market = datasets.load_splits("market1501", market_root, eval_only=True)
    hand = datasets.load_splits("11k_dorsal_right", hands_root, draw=2, eval_only=True)
    hd = datasets.load_splits("hd", hd_root, draw=1, eval_only=True)
  assert not caplog.records
  full = body_splits("market1501")
  assert market == {"query": full["query"], "gallery": full["gallery"]}
  full_hand = datasets.load_splits("11k_dorsal_right", hands_root, draw=2)
  assert hand == {"query": full_hand["query"], "gallery": full_hand["gallery"]}
  full_hd = datasets.load_splits("hd", hd_root, draw=1)
  assert hd == {"query": full_hd["query"], "gallery": full_hd["gallery"]}


def test_eval_only_hands_need_no_training_images(hands_root, tmp_path):
  """An 11k copy with only the images of one aspect's query and combined gallery evaluates; the full parse
  names a missing training image."""
  test = datasets.load_splits("11k_dorsal_left", hands_root, eval_only=True)
  os.symlink(hands_root / "HandInfo.csv", tmp_path / "HandInfo.csv")
  make_tree(tmp_path, [f"Hands/{os.path.basename(r.path)}" for r in test["query"] + test["gallery"]])
  splits = datasets.load_splits("11k_dorsal_left", tmp_path, eval_only=True)
  assert [os.path.basename(r.path) for r in splits["query"]] == [os.path.basename(r.path) for r in test["query"]]
  assert id_image_counts(splits["gallery"]) == (290, 290)
  with pytest.raises(FileNotFoundError, match=r"image\(s\) listed in .*HandInfo\.csv"):
    datasets.load_splits("11k_dorsal_left", tmp_path)


def test_eval_only_cuhk03_needs_only_test_images(cuhk03_raw):
  """Once the PNGs are extracted, a copy without the training PNGs (and without cuhk-03.mat) evaluates; the
  full parse wants the .mat to extract the missing training images again."""
  root, _ = cuhk03_raw
  full = datasets.load_splits("cuhk03_labeled", root)
  (root / "cuhk03_release" / "cuhk-03.mat").unlink()
  for record in full["train"]:
    os.unlink(record.path)
  splits = datasets.load_splits("cuhk03_labeled", root, eval_only=True)
  assert splits == {"query": full["query"], "gallery": full["gallery"]}
  with pytest.raises(FileNotFoundError, match=r"cuhk03_release/cuhk-03\.mat"):
    datasets.load_splits("cuhk03_labeled", root)


def test_a_parser_without_eval_only_still_evaluates(tmp_path, monkeypatch):
  """A dataset added without the `eval_only` argument keeps working; evaluation gets its test splits."""
  record, train = datasets.Record(str(tmp_path / "a.jpg"), 1, 1), datasets.Record(str(tmp_path / "t.jpg"), 2, 1, 0)
  plain = datasets.DatasetInfo(name="plain", kind="body", description="d", layout="l", folder="plain",
                               loader=lambda root: {"train": [train], "query": [record], "gallery": [record]})
  monkeypatch.setattr(datasets, "DATASETS", {"plain": plain})
  assert set(datasets.load_splits("plain", tmp_path)) == {"train", "query", "gallery"}
  assert datasets.load_splits("plain", tmp_path, eval_only=True) == {"query": [record], "gallery": [record]}
