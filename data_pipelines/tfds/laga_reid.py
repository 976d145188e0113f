"""TFDS builder `laga_reid`: any registered dataset, parsed by `data_pipelines.datasets`, as TFRecords.

One BuilderConfig per dataset name (plus the hand sets' draws 1-9 and MSMT17 with list_val merged):

  python -m data_pipelines.tfds --config market1501 --manual_dir /data --data_dir ~/tensorflow_datasets
  ds = tfds.load("laga_reid/market1501", split="query", data_dir="~/tensorflow_datasets")
                                                          # (after `import data_pipelines.tfds`)

Examples keep the original encoded image bytes (JPEG or PNG), so a prepared dataset can be read from any
filesystem tf.io supports (gs://, s3://, ...); the source folders themselves must be local.
"""

import dataclasses
import fnmatch
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import datasets

HAND_DRAWS = range(1, 10)  # draw 0 is the plain config name


@dataclasses.dataclass(eq=False)
class ReidConfig(tfds.core.BuilderConfig):
  """A dataset of the registry and the `load_splits` options it is parsed with."""
  dataset: str = ""
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


GENERATED = ("demo", "demo_hands")  # drawn on first use into the download folder, nothing to place by hand


def _configs() -> list[ReidConfig]:
  configs = []
  for name, info in datasets.DATASETS.items():
    configs.append(ReidConfig(name=name, description=info.description, dataset=name))
    if "draw" in info.options:
      configs += [ReidConfig(name=f"{name}_draw{draw}", description=f"{info.description} Query/gallery draw {draw}.",
                             dataset=name, options={"draw": draw}) for draw in HAND_DRAWS]
    if "merge_val" in info.options:
      configs.append(ReidConfig(name=f"{name}_merge_val", description=f"{info.description} list_val merged into "
                                "train (32,621 images).", dataset=name, options={"merge_val": True}))
  return configs


def _manual_instructions() -> str:
  folders = {}
  for name, info in datasets.DATASETS.items():
    if name not in GENERATED:
      folders.setdefault(info.folder, (info, []))[1].append(name)
  lines = ["Place each dataset's extracted download folder in `manual_dir` under the name given here (or pass",
           "the dataset folder itself as `--manual_dir`). A custom CSV manifest may be `<manual_dir>/custom.csv`.",
           "The demo configs (demo, demo_hands) need nothing: they are generated.", ""]
  for folder, (info, names) in folders.items():
    lines += [f"<manual_dir>/{folder}/   for config(s) {', '.join(names)}:", info.layout, ""]
  return "\n".join(lines)


class LagaReid(tfds.core.GeneratorBasedBuilder):
  """Person re-identification sets of LAGA-Net (body and hand), one config per dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "pid": tfds.features.Scalar(np.int64, doc="original identity (0 = distractor)"),
            "camid": tfds.features.Scalar(np.int64, doc="camera as in the dataset (-1 = hand sets, no camera)"),
            "label": tfds.features.Scalar(np.int64, doc="train/val: contiguous class 0..n-1; else -1"),
            "path": tfds.features.Text(doc="image path relative to the dataset folder"),
        }),
        # Query and gallery order must match between runs and between the features and their metadata.
        disable_shuffling=True,
    )

  def _dataset_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    info = datasets.get_dataset_info(self.builder_config.dataset)
    if info.name in GENERATED:
      return os.fspath(dl_manager.download_dir / info.name)
    manual_dir = dl_manager.manual_dir
    # <manual_dir>/<folder>, a manifest <manual_dir>/<folder>.csv (custom), or the dataset folder itself.
    for candidate in (manual_dir / info.folder, manual_dir / f"{info.folder}.csv"):
      if candidate.exists():
        return os.fspath(candidate)
    return os.fspath(manual_dir)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._dataset_root(dl_manager)
    splits = datasets.load_splits(self.builder_config.dataset, root, **self.builder_config.options)
    base = root if os.path.isdir(root) else os.path.dirname(root)  # a manifest's paths are relative to it
    return {split: self._generate_examples(records, base) for split, records in splits.items()}

  def _generate_examples(self, records: list[datasets.Record], base: str) -> Iterator[tuple[int, dict]]:
    for index, record in enumerate(records):
      yield index, {"image": record.path, "pid": record.pid, "camid": record.camid, "label": record.label,
                    "path": os.path.relpath(record.path, base)}


def matching_configs(patterns: Sequence[str]) -> list[str]:
  """Config names matching shell-style `patterns` (e.g. `11k_dorsal_right*`), in registry order."""
  names = [c.name for c in LagaReid.BUILDER_CONFIGS]
  unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
  if unmatched:
    raise ValueError(f"no laga_reid config matches {unmatched}; configs: {', '.join(names)}")
  return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def prepare(config: str, data_dir: str, manual_dir: Optional[str] = None) -> LagaReid:
  """Writes the TFRecords of one config under `data_dir` (a no-op when already there) and returns the builder."""
  builder = LagaReid(config=config, data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=download_config)
  return builder


# --- reading a prepared config back for training and evaluation (config.data.source = "tfds") --------------

DEFAULT_DATA_DIR = "~/tensorflow_datasets"  # what `python -m data_pipelines.tfds` writes to by default


def config_name(dataset: str, options: Mapping[str, Any]) -> str:
  """The builder config that holds `dataset` parsed with `options` (see `_configs`): a non-zero `draw` picks
  `<name>_draw<d>`, `merge_val` picks `<name>_merge_val`; other options only choose among the same files."""
  name = dataset
  if options.get("draw"):
    name += f"_draw{int(options['draw'])}"
  if options.get("merge_val"):
    name += "_merge_val"
  return name


def prepared_dir(data_dir: str, config: str) -> str:
  """`<data_dir>/laga_reid/<config>/<version>`, where `prepare` writes a config's TFRecords."""
  return os.path.join(os.path.expanduser(data_dir or DEFAULT_DATA_DIR), "laga_reid", config, str(LagaReid.VERSION))


def missing_preparation(data_dir: str, config: str) -> Optional[str]:
  """None when `config` is prepared under `data_dir`, else the reason and the command that prepares it."""
  import tensorflow as tf
  folder = prepared_dir(data_dir, config)
  if tf.io.gfile.exists(os.path.join(folder, "dataset_info.json")):
    return None
  known = LagaReid.builder_configs.get(config)
  source = "" if known is not None and known.dataset in GENERATED else " --manual_dir <folder of the download>"
  return (f"no prepared laga_reid/{config} at {folder}; write it with: python -m data_pipelines.tfds "
          f"--config {config}{source} --data_dir {data_dir or DEFAULT_DATA_DIR}")


def load_records(data_dir: str, config: str, root: str, *, eval_only: bool = False) -> dict:
  """{split: [Record]} of a prepared config, read from its TFRecords alone (the dataset's own folder is not
  needed): each record's path is `root` joined with the stored relative path, the key under which
  `encoded_images` finds its bytes, so a bucket or TPU user trains from the TFRecords only."""
  from data_pipelines.datasets.common import Record
  missing = missing_preparation(data_dir, config)
  if missing:
    raise FileNotFoundError(f"config.data.source='tfds': {missing}")
  builder = tfds.builder_from_directory(prepared_dir(data_dir, config))
  base = os.path.dirname(root) if os.path.isfile(root) else root
  splits = {}
  for split in builder.info.splits:
    if eval_only and split not in ("query", "gallery"):
      continue
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    splits[split] = [Record(os.path.join(base, e["path"].decode()), int(e["pid"]), int(e["camid"]), int(e["label"]))
                     for e in dataset.map(lambda e: {k: e[k] for k in ("path", "pid", "camid", "label")})
                     .as_numpy_iterator()]
  return splits


def encoded_images(data_dir: str, config: str, keys: Sequence[str],
                   identities: Optional[Sequence[tuple]] = None) -> np.ndarray:
  """The stored bytes (the source files' own, see `_info`) of the examples whose `path` feature is each of
  `keys`, in the order of `keys`: an object array of `bytes`, one per key.

  Every split is searched (records of a hand set's draw or of a cross-dataset target may sit in any of
  them), and reading stops once every key is found. With `identities`, (pid, camid) per key, the stored
  identity must match too, so TFRecords prepared from another copy of the dataset are refused.
  """
  missing = missing_preparation(data_dir, config)
  if missing:
    raise FileNotFoundError(f"config.data.source='tfds': {missing}")
  wanted: dict = {}
  for position, key in enumerate(keys):
    wanted.setdefault(key, []).append(position)
  found = np.empty(len(keys), object)
  builder = tfds.builder_from_directory(prepared_dir(data_dir, config))
  remaining = len(wanted)
  for split in builder.info.splits:
    if not remaining:
      break
    dataset = builder.as_dataset(split=split, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    for example in dataset.as_numpy_iterator():
      positions = wanted.get(example["path"].decode())
      if positions is None or found[positions[0]] is not None:
        continue
      for position in positions:
        if identities is not None and tuple(identities[position]) != (example["pid"], example["camid"]):
          raise ValueError(
              f"config.data.source='tfds': {keys[position]} is person {example['pid']} camera "
              f"{example['camid']} in laga_reid/{config} but {tuple(identities[position])} in the parsed "
              f"dataset; were the TFRecords prepared from another copy of it?")
        found[position] = example["image"]
      remaining -= 1
      if not remaining:
        break
  if remaining:
    absent = [key for key, positions in wanted.items() if found[positions[0]] is None]
    raise ValueError(f"config.data.source='tfds': {len(absent)} of {len(wanted)} images are not in "
                     f"laga_reid/{config} at {prepared_dir(data_dir, config)}, e.g. {absent[0]} (prepared from "
                     "another copy or other options of the dataset?)")
  return found
