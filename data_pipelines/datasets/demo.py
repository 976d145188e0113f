"""The synthetic demo set (`data_pipelines.demo`): Market-1501 layout, generated on first use."""

from data_pipelines.datasets import common, market1501

LAYOUT = """\
  bounding_box_train/  query/  bounding_box_test/   (Market-1501 names, e.g. 0012_c1s1_000123_01.jpg)
  demo_dataset.json                                  (generator parameters and counts)
(written by `python -m data_pipelines.demo --root <root>`, or automatically when root has no demo data)"""


def _load(root: str, info: common.DatasetInfo, eval_only: bool, **generator_args) -> common.Splits:
  root = common.absolute_root(root, info.name)
  if not any((root / folder).exists() for folder in market1501.SPLIT_FOLDERS.values()):
    from data_pipelines.demo import generate_demo_dataset  # Deferred: only needed the first time.

    generate_demo_dataset(root, **generator_args)
  # No count check: the generator's parameters decide the counts.
  return market1501.parse_market_layout(root, info, market1501.PATTERN, market1501.EXAMPLE, eval_only=eval_only)


def load(root: str, eval_only: bool = False) -> common.Splits:
  """Demo splits; generates the default demo dataset under `root` when none of its folders exist yet."""
  return _load(root, INFO, eval_only)


def load_b(root: str, eval_only: bool = False) -> common.Splits:
  """The second demo site (other identities, cameras, lighting), for cross-dataset evaluation."""
  return _load(root, INFO_B, eval_only, domain=1, seed=1)


INFO = common.DatasetInfo(
    name="demo",
    kind="body",
    description="Synthetic demo set (Market-1501 layout) drawn by data_pipelines.demo in seconds.",
    layout=LAYOUT,
    folder="demo",
    loader=load,
)

INFO_B = common.DatasetInfo(
    name="demo_b",
    kind="body",
    description="A second synthetic site (other identities, dim scenes, strong camera casts) for cross-domain "
                "evaluation of a model trained on `demo`.",
    layout=LAYOUT.replace("--root <root>", "--root <root> --domain 1 --seed 1"),
    folder="demo_b",
    loader=load_b,
)
