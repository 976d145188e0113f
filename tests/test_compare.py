"""The comparison runner without training: labels, chained stages, the reuse check and the per-query file."""

import json
import pathlib

import pytest

from laga_jax import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(spec: str):
  """The config of `spec` ("configs/<file>.py[:arg]", relative to the checkout)."""
  return compare.load_config(str(ROOT / spec))


@pytest.mark.parametrize("spec, label", [
    ("configs/demo.py", "laga"), ("configs/demo.py:bot", "bot"), ("configs/demo.py:global", "global"),
    ("configs/market.py", "laga"), ("configs/ablation.py:cam", "cam"), ("configs/bot.py:market1501", "bot"),
    ("configs/pcb.py:market1501", "pcb"), ("configs/pcb.py:market1501_rpp", "pcb_rpp"),
    ("configs/pcb.py:market1501_rpp_finetune", "pcb_rpp_finetune"), ("configs/mgn.py:market1501", "mgn"),
    ("configs/mba.py:market1501", "mba"), ("configs/pcb.py:demo", "pcb"),
])
def test_labels_are_readable(spec, label):
  assert compare.label_of(spec, _load(spec)) == label


def test_table_iv_on_market_gets_one_label_per_model():
  """The rivals of Table IV on Market-1501 are one invocation: every config its own label and folder."""
  specs = ["configs/market.py", "configs/bot.py:market1501", "configs/pcb.py:market1501",
           "configs/pcb.py:market1501_rpp", "configs/mgn.py:market1501", "configs/mba.py:market1501"]
  configs = [_load(s) for s in specs]
  assert compare._labels(specs, configs, ()) == ["laga", "bot", "pcb", "pcb_rpp", "mgn", "mba"]


def test_clashing_and_bad_labels_are_named():
  specs = ["configs/market.py", "configs/ablation.py:laga"]
  configs = [_load(s) for s in specs]
  with pytest.raises(ValueError, match=r"configs/market.py and configs/ablation.py:laga both get the label "
                                       r"'laga'; .*--labels laga_0,laga_1"):
    compare._labels(specs, configs, ())
  assert compare._labels(specs, configs, ["paper", "ablation_full"]) == ["paper", "ablation_full"]
  with pytest.raises(ValueError, match=r"--labels: 1 label\(s\) for 2 config\(s\)"):
    compare._labels(specs, configs, ["only"])
  with pytest.raises(ValueError, match=r"--labels: 'a/b' cannot name a folder"):
    compare._labels(specs, configs, ["a/b", "c"])
  with pytest.raises(ValueError, match=r"both get the label 'x'"):
    compare._labels(specs, configs, ["x", "x"])


def test_pcb_stages_chain_through_the_comparison_folders(tmp_path):
  specs = ["configs/demo.py", "configs/pcb.py:demo", "configs/pcb.py:demo_rpp", "configs/pcb.py:demo_rpp_finetune"]
  configs = [_load(s) for s in specs]
  assert configs[2].model.init_from == "runs/pcb_demo"   # the path a run outside a comparison uses
  labels = compare._labels(specs, configs, ())
  compare.chain_stages(configs, labels, tmp_path)
  assert [c.model.init_from for c in configs] == ["", "", str(tmp_path / "pcb"), str(tmp_path / "pcb_rpp")]


def test_a_workdir_of_another_recipe_is_refused_with_the_fields(tmp_path):
  """Fields that change what is learned refuse the workdir; its root, logging and eval options do not."""
  config = _load("configs/demo.py")
  saved = json.loads(config.to_json_best_effort())
  saved["data"]["root"] = "/elsewhere/demo"
  saved["train"]["log_every_steps"] = 1
  saved["eval"]["batch_size"] = 8
  (tmp_path / "config.json").write_text(json.dumps(saved))
  compare.check_reusable(tmp_path, config)  # nothing that changes the trained model differs
  assert compare.config_differences(saved, config, section="eval") == [
      "eval.batch_size: saved 8, configured 50"]
  saved["train"]["num_epochs"] = 3
  saved["model"]["width"] = 8
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=r"trained with another recipe than its config: model.width: saved 8, "
                                       r"configured 16; train.num_epochs: saved 3, configured 15\. Delete"):
    compare.check_reusable(tmp_path, config)


def test_per_query_file_is_the_first_targets(tmp_path):
  config = _load("configs/demo.py")
  assert compare.per_query_file(tmp_path, {"per_query_file": "per_query_final_demo_b.npz"}, config) == \
      tmp_path / "per_query_final_demo_b.npz"
  # Results written before the file was named: the evaluation's naming rule.
  assert compare.per_query_file(tmp_path, {"dataset": "demo_b"}, config) == tmp_path / "per_query_final_demo_b.npz"
  assert compare.per_query_file(tmp_path, {"dataset": "demo"}, config) == tmp_path / "per_query_final.npz"
