"""Weight files without torch (.pth zip/legacy, .safetensors, .npz) and the torchvision -> Flax mapping."""

import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from laga_jax import weights
from laga_jax.models import resnet

TINY = dict(stage_sizes=(1, 1, 1, 1), width=8)
PTH_FILES = ("tiny_state_dict.pth", "tiny_checkpoint_nested.pth", "tiny_state_dict_legacy.pth")


def synthetic_state_dict(seed: int = 0, num_classes=None, **arch) -> dict:
  """Random torchvision-layout weights; int64 zeros for num_batches_tracked, as torch stores them."""
  rng = np.random.default_rng(seed)
  return {k: (np.zeros(s, np.int64) if k.endswith("num_batches_tracked")
              else rng.standard_normal(s).astype(np.float32))
          for k, s in weights.torchvision_resnet_shapes(num_classes=num_classes, **arch).items()}


@pytest.fixture(scope="module")
def tiny_template():
  model = resnet.ResNet(**TINY, num_classes=3)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


# --- .pth ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PTH_FILES)
def test_pth_reader_matches_torch(fixtures_dir, name):
  expected = np.load(fixtures_dir / "tiny_state_dict_expected.npz")
  state_dict = weights.load_state_dict(fixtures_dir / name)
  assert list(state_dict) == list(expected.files)  # the saved order
  for key, value in state_dict.items():
    assert isinstance(value, np.ndarray), key
    assert value.dtype == expected[key].dtype and value.shape == expected[key].shape, key
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  assert state_dict["half.weight"].dtype == np.float16
  counter = state_dict["bn1.num_batches_tracked"]
  assert counter.dtype == np.int64 and counter.ndim == 0
  # The two views share one storage: transposed (strides (1, 4)) and sliced (offset 8) reads of it.
  np.testing.assert_array_equal(state_dict["view.slice"], state_dict["view.transposed"].T[2:4])


def test_pth_fixture_has_shared_storage(fixtures_dir):
  """Guard that the fixture exercises strides and offsets: 11 tensors live in 10 storage files."""
  with zipfile.ZipFile(fixtures_dir / "tiny_state_dict.pth") as archive:
    storages = [n for n in archive.namelist() if n.startswith("tiny_state_dict/data/")]
  assert len(storages) == len(np.load(fixtures_dir / "tiny_state_dict_expected.npz").files) - 1


def _write_zip_pth(path, payload: bytes, extra=None):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("ckpt/data.pkl", payload)
    for name, data in (extra or {}).items():
      archive.writestr(f"ckpt/{name}", data)


class _Storage:
  def __init__(self, kind: str, array: np.ndarray):
    self.kind, self.array = kind, array


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())


def _mini_torch_save(path, tensors: dict, monkeypatch, byteorder: str = "little") -> None:
  """`torch.save`'s zip layout written from its definition, with stand-ins for the torch globals."""
  fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while saving")

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  kinds = {}
  for kind in {t.args[0].kind for t in tensors.values()}:
    kinds[kind] = type(kind, (), {"__module__": "torch"})
    setattr(fake_torch, kind, kinds[kind])
  monkeypatch.setitem(sys.modules, "torch", fake_torch)
  monkeypatch.setitem(sys.modules, "torch._utils", fake_utils)
  _Tensor.__reduce__ = lambda self: (_rebuild_tensor_v2, self.args)
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        key = storages.setdefault(id(obj), (str(len(storages)), obj))[0]
        return ("storage", kinds[obj.kind], key, "cpu", obj.array.size)
      return None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
  order = "<" if byteorder == "little" else ">"
  files = {"byteorder": byteorder}
  for key, storage in storages.values():
    array = storage.array.view(np.uint16) if storage.array.dtype == ml_dtypes.bfloat16 else storage.array
    files[f"data/{key}"] = array.astype(array.dtype.newbyteorder(order)).tobytes()
  _write_zip_pth(path, buffer.getvalue(), files)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_pth_bfloat16_ints_and_byteorder(tmp_path, monkeypatch, byteorder):
  bf16 = np.array([1.5, -2.0, 3.25, 0.0, 8.0, -0.5], ml_dtypes.bfloat16)
  ints = np.arange(12, dtype=np.int32)
  shared = _Storage("BFloat16Storage", bf16)
  tensors = {"bf16.matrix": _Tensor(shared, 0, (2, 3), (3, 1)),
             "bf16.column": _Tensor(shared, 1, (2,), (3,)),
             "int.view": _Tensor(_Storage("IntStorage", ints), 2, (2, 2), (1, 5)),
             "flags": _Tensor(_Storage("BoolStorage", np.array([True, False])), 0, (2,), (1,))}
  path = tmp_path / "mini.pth"
  _mini_torch_save(path, tensors, monkeypatch, byteorder)
  monkeypatch.undo()
  loaded = weights.load_state_dict(path)
  assert list(loaded) == list(tensors)
  assert loaded["bf16.matrix"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded["bf16.matrix"].astype(np.float32),
                                bf16.astype(np.float32).reshape(2, 3))
  np.testing.assert_array_equal(loaded["bf16.column"].astype(np.float32), [-2.0, 8.0])
  assert loaded["int.view"].dtype == np.int32
  np.testing.assert_array_equal(loaded["int.view"], [[2, 7], [3, 8]])
  np.testing.assert_array_equal(loaded["flags"], [True, False])


def test_pth_view_past_its_storage(tmp_path, monkeypatch):
  tensors = {"w": _Tensor(_Storage("FloatStorage", np.zeros(4, np.float32)), 2, (2, 2), (2, 1))}
  path = tmp_path / "overrun.pth"
  _mini_torch_save(path, tensors, monkeypatch)
  monkeypatch.undo()
  with pytest.raises(weights.WeightsError,
                     match=r"overrun\.pth: tensor of size \(2, 2\).* reads past its storage"):
    weights.load_state_dict(path)


def test_pth_refuses_arbitrary_globals(tmp_path):
  import datetime
  path = tmp_path / "evil.pth"
  _write_zip_pth(path, pickle.dumps({"x": datetime.date(2020, 1, 1)}, protocol=2))
  with pytest.raises(weights.WeightsError, match=r"evil\.pth: refusing to unpickle datetime\.date"):
    weights.load_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 broken zip"])
def test_corrupt_pth_names_the_file(tmp_path, content):
  path = tmp_path / "broken.pth"
  path.write_bytes(content)
  with pytest.raises(weights.WeightsError, match=r"broken\.pth"):
    weights.load_state_dict(path)


def test_truncated_pth_storage(tmp_path, fixtures_dir):
  """A storage file shorter than its element count is an error, not a read past the buffer."""
  src = fixtures_dir / "tiny_state_dict.pth"
  path = tmp_path / "short.pth"
  with zipfile.ZipFile(src) as archive:
    files = {n.split("/", 1)[1]: archive.read(n) for n in archive.namelist()}
  files["data/0"] = files["data/0"][:-4]
  _write_zip_pth(path, files.pop("data.pkl"), files)
  with pytest.raises(weights.WeightsError, match=r"short\.pth: storage 'ckpt/data/0' has .* bytes"):
    weights.load_state_dict(path)


def test_legacy_truncated(tmp_path, fixtures_dir):
  raw = (fixtures_dir / "tiny_state_dict_legacy.pth").read_bytes()
  path = tmp_path / "legacy_cut.pth"
  path.write_bytes(raw[:-10])
  with pytest.raises(weights.WeightsError, match=r"legacy_cut\.pth: .*(truncated|corrupt)"):
    weights.load_state_dict(path)


# --- safetensors / npz --------------------------------------------------------------------------------------

def _all_dtypes() -> dict:
  rng = np.random.default_rng(0)
  out = {"w.f32": rng.standard_normal((3, 2)).astype(np.float32),
         "w.f16": rng.standard_normal((4,)).astype(np.float16),
         "w.bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
         "w.f64": rng.standard_normal((2,)),
         "n.i64": np.array(7, np.int64)}
  for dtype in (np.int32, np.int16, np.int8, np.uint8):
    out[f"n.{np.dtype(dtype).name}"] = rng.integers(-100 if dtype != np.uint8 else 0, 100, (5,)).astype(dtype)
  out["b.bool"] = np.array([True, False, True])
  out["empty"] = np.zeros((0, 4), np.float32)
  return out


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip(tmp_path, suffix):
  state_dict = _all_dtypes()
  if suffix == ".npz":
    state_dict.pop("w.bf16")  # NumPy's format has no bfloat16
  path = tmp_path / f"w{suffix}"
  weights.save_state_dict(path, state_dict)
  loaded = weights.load_state_dict(path)
  assert sorted(loaded) == sorted(state_dict)  # safetensors stores tensors in its own order
  for key, value in state_dict.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_safetensors_written_by_hand(tmp_path):
  """A file laid out by the format's definition: metadata entry, offsets not in key order, bf16 bits."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.0, -2.0], ml_dtypes.bfloat16)
  blob_b, blob_a = b.view(np.uint16).astype("<u2").tobytes(), a.astype("<f4").tobytes()
  header = {"__metadata__": {"format": "pt"},
            "module.a": {"dtype": "F32", "shape": [2, 3],
                         "data_offsets": [len(blob_b), len(blob_b) + len(blob_a)]},
            "module.b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, len(blob_b)]}}
  encoded = json.dumps(header).encode()
  path = tmp_path / "hand.safetensors"
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob_b + blob_a)
  loaded = weights.load_state_dict(path)
  assert sorted(loaded) == ["a", "b"]  # the DataParallel prefix is gone
  np.testing.assert_array_equal(loaded["a"], a)
  assert loaded["b"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded["b"].astype(np.float32), [1.0, -2.0])


@pytest.mark.parametrize("tamper, match", [
    (lambda raw: raw[:20], r"bad\.safetensors: not a readable safetensors file \(.*header"),
    (lambda raw: raw[:-4], r"bad\.safetensors: not a readable safetensors file \(.*not fully covered"),
])
def test_corrupt_safetensors(tmp_path, tamper, match):
  path = tmp_path / "bad.safetensors"
  weights.save_state_dict(path, {"w": np.ones((4, 4), np.float32)})
  path.write_bytes(tamper(path.read_bytes()))
  with pytest.raises(weights.WeightsError, match=match):
    weights.load_state_dict(path)


def test_unknown_extension_and_missing_file(tmp_path):
  path = tmp_path / "weights.h5"
  path.write_bytes(b"x")
  with pytest.raises(weights.WeightsError, match=r"weights\.h5: unknown weight file type '\.h5'"):
    weights.load_state_dict(path)
  with pytest.raises(weights.WeightsError, match=r"nothere\.pth: no such weight file"):
    weights.load_state_dict(tmp_path / "nothere.pth")


def test_nested_checkpoint_without_state_dict(tmp_path):
  path = tmp_path / "ckpt.npz"
  np.savez(path)  # an archive with no tensors
  with pytest.raises(weights.WeightsError, match=r"ckpt\.npz: "):
    weights.load_state_dict(path)


# --- mapping onto the ResNet --------------------------------------------------------------------------------

def test_torchvision_key_table_matches_fixture(fixtures_dir):
  fx = np.load(fixtures_dir / "torchvision_resnet50.npz")
  shapes = weights.torchvision_resnet_shapes((3, 4, 6, 3), 64, num_classes=1000)
  assert list(shapes) == [str(k) for k in fx["state_dict_keys"]]
  assert list(shapes.values()) == [tuple(int(d) for d in row[:n])
                                   for row, n in zip(fx["state_dict_shapes"], fx["state_dict_ndim"])]


def test_resnet_variables_layout(tiny_template):
  state_dict = synthetic_state_dict(num_classes=3, **TINY)
  variables = weights.resnet_variables(state_dict, tiny_template)
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["conv1"]["kernel"], state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  block = params["layer2"]["block0"]
  np.testing.assert_array_equal(block["conv2"]["kernel"],
                                state_dict["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(block["downsample_conv"]["kernel"][0, 0],
                                state_dict["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(block["downsample_bn"]["scale"], state_dict["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(stats["layer2"]["block0"]["downsample_bn"]["var"],
                                state_dict["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(stats["layer4"]["block0"]["bn3"]["mean"],
                                state_dict["layer4.0.bn3.running_mean"])
  np.testing.assert_array_equal(params["bn1"]["bias"], state_dict["bn1.bias"])
  np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
  np.testing.assert_array_equal(params["fc"]["bias"], state_dict["fc.bias"])
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      {c: tiny_template[c] for c in ("params", "batch_stats")})


def test_resnet_variables_without_fc_ignores_fc(tiny_template):
  template = jax.eval_shape(resnet.ResNet(**TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  variables = weights.resnet_variables(synthetic_state_dict(num_classes=3, **TINY), template)
  assert "fc" not in variables["params"]


def test_resnet_variables_casts_half_precision(tiny_template):
  state_dict = {k: v.astype(np.float16) if v.dtype == np.float32 else v
                for k, v in synthetic_state_dict(num_classes=3, **TINY).items()}
  variables = weights.resnet_variables(state_dict, tiny_template)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_missing_key_is_named(tiny_template):
  state_dict = synthetic_state_dict(num_classes=3, **TINY)
  del state_dict["layer3.0.bn2.running_var"]
  with pytest.raises(weights.WeightsError,
                     match=r"my\.pth: .*1 missing key\(s\): layer3\.0\.bn2\.running_var \(shape \(32,\)\)"):
    weights.resnet_variables(state_dict, tiny_template, source="my.pth")


def test_unexpected_key_is_named(tiny_template):
  state_dict = synthetic_state_dict(num_classes=3, **TINY)
  state_dict["layer1.1.conv1.weight"] = np.zeros((8, 32, 1, 1), np.float32)
  with pytest.raises(weights.WeightsError,
                     match=r"1 unexpected key\(s\): layer1\.1\.conv1\.weight \(8, 32, 1, 1\)"):
    weights.resnet_variables(state_dict, tiny_template)


def test_wrong_shape_is_named(tiny_template):
  state_dict = synthetic_state_dict(num_classes=3, **TINY)
  state_dict["layer2.0.conv2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(weights.WeightsError,
                     match=r"mis-shaped key\(s\): layer2\.0\.conv2\.weight: file has \(16, 16, 1, 1\), "
                           r"model expects \(16, 16, 3, 3\)"):
    weights.resnet_variables(state_dict, tiny_template)


def test_errors_name_the_loaded_file(tmp_path, tiny_template):
  state_dict = synthetic_state_dict(num_classes=3, **TINY)
  state_dict["layer9.weight"] = np.zeros((2,), np.float32)
  path = tmp_path / "extra.npz"
  weights.save_state_dict(path, state_dict)
  with pytest.raises(weights.WeightsError, match=r"extra\.npz: .*unexpected key\(s\): layer9\.weight \(2,\)"):
    weights.resnet_variables(weights.load_state_dict(path), tiny_template)


def test_resnet50_template_and_cli(tmp_path, capsys):
  """The CLI checks a full ResNet-50 state dict against the model and writes a torch-free copy."""
  state_dict = synthetic_state_dict(num_classes=1000, stage_sizes=(3, 4, 6, 3), width=64)
  src, out = tmp_path / "resnet50.safetensors", tmp_path / "resnet50.npz"
  weights.save_state_dict(src, state_dict)
  weights.main([str(src), str(out)])
  assert "ResNet-50 layout checked" in capsys.readouterr().out
  loaded = weights.load_state_dict(out)
  assert sorted(loaded) == sorted(state_dict)
  np.testing.assert_array_equal(loaded["layer4.2.conv3.weight"], state_dict["layer4.2.conv3.weight"])
  del state_dict["layer4.2.bn3.weight"]
  weights.save_state_dict(src, state_dict)
  with pytest.raises(weights.WeightsError, match=r"resnet50\.safetensors: .*layer4\.2\.bn3\.weight"):
    weights.main([str(src), str(tmp_path / "never.npz")])
  assert not (tmp_path / "never.npz").exists()
