"""Pretrained backbone weights: read PyTorch / safetensors / npz state dicts and map them onto Flax trees.

`.pth` files are read **without torch**: a restricted unpickler that rebuilds tensors as NumPy arrays and
refuses every global a state dict does not need (checkpoints are pickles, and pickles can run code).

    python -m laga_jax.weights resnet50-0676ba61.pth resnet50.npz    # convert once, check it fits ResNet-50
"""

import argparse
import collections
import io
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PathLike = os.PathLike | str
StateDict = Dict[str, np.ndarray]

# NumPy has no bfloat16; ml_dtypes (a JAX dependency) provides it.
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# torch storage class name -> NumPy dtype.
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": BFLOAT16, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
# Keys under which training scripts commonly nest the model's state dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params", "module")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
RESAVE_HINT = "re-save it with torch >= 1.6: `torch.save(torch.load(path), new_path)`"


class WeightsError(ValueError):
  """A weight file that cannot be read, or whose keys and shapes do not fit the model."""


class LoadedStateDict(dict):
  """{name: array} that remembers the file it was read from, so that mapping errors can name it."""

  def __init__(self, items: Mapping[str, np.ndarray], path: PathLike):
    super().__init__(items)
    self.path = str(path)


def _from_bytes(raw: bytes, dtype: np.dtype, count: int = -1, big_endian: bool = False) -> np.ndarray:
  """Decode raw bytes into a writable native-order array; bfloat16 is read as uint16 (ml_dtypes' bfloat16
  has no byte-swapped variant) and viewed."""
  wire = np.dtype(np.uint16) if dtype == BFLOAT16 else dtype
  wire = wire.newbyteorder(">" if big_endian else "<")
  array = np.frombuffer(raw, wire, count=count).astype(wire.newbyteorder("="))
  return array.view(BFLOAT16) if dtype == BFLOAT16 else array


# --- .pth (torch.save) --------------------------------------------------------------------------------------

class _Storage:
  """One torch storage: a flat array of `numel` elements; legacy files fill `data` after unpickling."""

  def __init__(self, dtype: np.dtype, numel: int, data: Optional[np.ndarray] = None):
    self.dtype, self.numel, self.data = dtype, numel, data


class _StorageView:
  """A legacy view into a root storage (`view_metadata` = (key, offset, size)), resolved lazily."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel, self.dtype = root, offset, numel, root.dtype

  @property
  def data(self) -> Optional[np.ndarray]:
    root = self.root.data
    return None if root is None else root[self.offset:self.offset + self.numel]


class _Tensor:
  """A tensor awaiting its storage bytes: torch's `_rebuild_tensor_v2` arguments."""

  def __init__(self, storage: Any, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialise(self, path: PathLike) -> np.ndarray:
    flat = self.storage.data
    if flat is None:
      raise WeightsError(f"{path}: a tensor's storage was never written (truncated file?)")
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
      raise WeightsError(f"{path}: tensor of size {self.size}, stride {self.stride}, offset {self.offset} "
                         f"reads past its storage of {flat.size} elements (corrupt file)")
    strides = tuple(s * flat.itemsize for s in self.stride)
    return np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, strides).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
  """`torch._utils._rebuild_tensor(_v2)`; requires_grad, hooks and metadata do not matter for weights."""
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is its data here."""
  return data


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. inside persistent ids."""

  def __init__(self, name: str):
    self.name, self.dtype = name, TORCH_STORAGE_DTYPES[name]


_ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): lambda: _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda: _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _rebuild_parameter,
    ("torch", "Size"): lambda: tuple,
    **{("torch", name): (lambda name=name: _StorageType(name)) for name in TORCH_STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles torch state dicts into `_Tensor`s; any other global is refused, so no code can run."""

  def __init__(self, file, path: PathLike, load_storage: Callable[[tuple], Any]):
    super().__init__(file, encoding="utf-8")
    self._path, self._load_storage = path, load_storage

  def find_class(self, module: str, name: str) -> Any:
    factory = _ALLOWED_GLOBALS.get((module, name))
    if factory is None:
      raise WeightsError(f"{self._path}: refusing to unpickle {module}.{name}; only state dicts of tensors "
                         "are supported (save `model.state_dict()`, not the model object)")
    return factory()

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
      raise WeightsError(f"{self._path}: unsupported persistent id {pid!r:.120} (expected a torch storage)")
    return self._load_storage(pid)


def _materialise(obj: Any, path: PathLike) -> Any:
  """Replace every `_Tensor` in a nest of dicts / lists / tuples by its NumPy array."""
  if isinstance(obj, _Tensor):
    return obj.materialise(path)
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, path)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, path) for v in obj)
  return obj


def _read_zip_pth(path: PathLike) -> Any:
  """torch >= 1.6 format: a zip with `<name>/data.pkl` and one raw file per storage, `<name>/data/<key>`."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise WeightsError(f"{path}: expected one '<name>/data.pkl' in the zip archive, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: Dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
      _, storage_type, key, _location, numel = pid[:5]
      if key not in storages:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise WeightsError(f"{path}: storage {member!r} is missing from the archive")
        dtype = storage_type.dtype
        raw = archive.read(member)
        if len(raw) < numel * dtype.itemsize:
          raise WeightsError(f"{path}: storage {member!r} has {len(raw)} bytes, expected "
                             f"{numel} x {dtype.itemsize} ({storage_type.name})")
        data = _from_bytes(raw, dtype, numel, big_endian=byteorder == "big")
        storages[key] = _Storage(dtype, numel, data)
      return storages[key]

    obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()
  return _materialise(obj, path)


def _read_legacy_pth(path: PathLike) -> Any:
  """torch < 1.6 format: pickles of magic, protocol, sys info, the object, storage keys; then raw storages."""
  with open(path, "rb") as f:
    header = _RestrictedUnpickler(f, path, lambda pid: None)
    magic = header.load()
    if magic != LEGACY_MAGIC:
      raise WeightsError(f"{path}: neither a zip archive nor a legacy torch file (bad magic number)")
    protocol = header.load()
    if protocol != LEGACY_PROTOCOL:
      raise WeightsError(f"{path}: legacy torch protocol {protocol} is not supported; {RESAVE_HINT}")
    sys_info = header.load()
    big_endian = not sys_info.get("little_endian", True)
    storages: Dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> Any:
      if len(pid) != 6:
        raise WeightsError(f"{path}: unexpected legacy storage id {pid!r:.120}; {RESAVE_HINT}")
      _, storage_type, key, _location, numel, view = pid
      root = storages.setdefault(key, _Storage(storage_type.dtype, numel))
      if view is not None:
        _view_key, offset, view_numel = view
        return _StorageView(root, offset, view_numel)
      return root

    obj = _RestrictedUnpickler(f, path, load_storage).load()
    keys = _RestrictedUnpickler(f, path, lambda pid: None).load()
    for key in keys:
      if key not in storages:
        raise WeightsError(f"{path}: storage {key!r} is listed but never referenced; {RESAVE_HINT}")
      storage = storages[key]
      (numel,) = struct.unpack(">q" if big_endian else "<q", f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
        raise WeightsError(f"{path}: storage {key!r} holds {len(raw)} bytes for {numel} elements, expected "
                           f"{storage.numel} (truncated or corrupt file)")
      storage.data = _from_bytes(raw, storage.dtype, big_endian=big_endian)
  return _materialise(obj, path)


def _read_pth(path: PathLike) -> Any:
  try:
    if zipfile.is_zipfile(path):
      return _read_zip_pth(path)
    return _read_legacy_pth(path)
  except WeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError, TypeError,
          ValueError, AttributeError, IndexError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); if it was "
                       f"saved by an old torch, {RESAVE_HINT}") from e


# --- .safetensors and .npz ----------------------------------------------------------------------------------

def _read_safetensors(path: PathLike) -> StateDict:
  """A .safetensors file through the `safetensors` package (header and offsets checked there), as NumPy
  arrays in the file's data order; bfloat16 is kept as ml_dtypes' bfloat16."""
  import safetensors
  try:
    tensors = safetensors.deserialize(pathlib.Path(path).read_bytes())
  except safetensors.SafetensorError as e:
    raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
  out: StateDict = {}
  for name, info in tensors:
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise WeightsError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; supported: "
                         f"{sorted(SAFETENSORS_DTYPES)}")
    out[name] = _from_bytes(info["data"], SAFETENSORS_DTYPES[info["dtype"]]).reshape(tuple(info["shape"]))
  return out


def save_safetensors(path: PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Write a state dict as .safetensors with the `safetensors` package (bfloat16 included)."""
  import safetensors
  arrays, specs = [], {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    dtype = value.dtype if value.dtype == BFLOAT16 else value.dtype.newbyteorder("=")
    if dtype not in SAFETENSORS_DTYPES.values():
      raise WeightsError(f"{path}: cannot store {key!r} of dtype {value.dtype} as safetensors")
    little = np.array(value, value.dtype if value.dtype == BFLOAT16 else dtype.newbyteorder("<"), order="C")
    arrays.append(little)  # alive until written: the specs point into these buffers
    specs[key] = safetensors.TensorSpec(dtype=dtype.name, shape=little.shape, data_ptr=little.ctypes.data,
                                        data_len=little.nbytes)
  safetensors.serialize_file(specs, str(path))
  del arrays


def _read_npz(path: PathLike) -> StateDict:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise WeightsError(f"{path}: not a readable .npz archive ({e})") from e


# --- state dicts --------------------------------------------------------------------------------------------

def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _find_state_dict(obj: Any, path: PathLike) -> StateDict:
  """The tensor dict itself, or the one a training checkpoint nests under `state_dict`, `model`, …"""
  if _is_state_dict(obj):
    return dict(obj)
  if isinstance(obj, Mapping):
    for key in NESTED_KEYS:
      if key in obj and _is_state_dict(obj[key]):
        return dict(obj[key])
    top = list(obj)[:20]
    raise WeightsError(f"{path}: no state dict found; top-level keys are {top}, expected a dict of tensors "
                       f"or one nested under one of {list(NESTED_KEYS)}")
  raise WeightsError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")


def _strip_prefix(state_dict: StateDict, prefix: str = "module.") -> StateDict:
  """Drop the `module.` that `nn.DataParallel` / DDP put in front of every key."""
  if all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def load_state_dict(path: PathLike) -> LoadedStateDict:
  """Read `.pth`/`.pt` (zip or legacy torch format, no torch needed), `.safetensors` or `.npz` weights.

  Returns {name: array} in file order, with a checkpoint's nesting (`state_dict`, `model`, …) and a
  DataParallel `module.` prefix removed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such weight file (config.model.pretrained)")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
    obj = _read_pth(path)
  elif suffix == ".safetensors":
    obj = _read_safetensors(path)
  elif suffix == ".npz":
    obj = _read_npz(path)
  else:
    raise WeightsError(f"{path}: unknown weight file type {suffix!r}; expected .pth/.pt (torch.save), "
                       ".safetensors or .npz")
  return LoadedStateDict(_strip_prefix(_find_state_dict(obj, path)), path)


def save_state_dict(path: PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
  """Write a state dict as `.npz` or `.safetensors` (by extension), readable by `load_state_dict`."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    np.savez(path, **{k: np.asarray(v) for k, v in state_dict.items()})
  elif path.suffix == ".safetensors":
    save_safetensors(path, state_dict)
  else:
    raise WeightsError(f"{path}: can write .npz or .safetensors, not {path.suffix!r}")


# --- torch names -> Flax variables --------------------------------------------------------------------------

def torchvision_resnet_shapes(stage_sizes: Sequence[int], width: int = 64,
                              num_classes: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
  """Keys and shapes of torchvision's Bottleneck `ResNet(...).state_dict()`, in its order."""

  def bn(prefix: str, channels: int) -> Dict[str, Tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
            f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
            f"{prefix}.num_batches_tracked": ()}

  shapes = {"conv1.weight": (width, 3, 7, 7), **bn("bn1", width)}
  in_channels = width
  for stage, num_blocks in enumerate(stage_sizes, start=1):
    inner = width * 2**(stage - 1)
    out = inner * 4
    for block in range(num_blocks):
      p = f"layer{stage}.{block}"
      shapes.update({f"{p}.conv1.weight": (inner, in_channels, 1, 1), **bn(f"{p}.bn1", inner),
                     f"{p}.conv2.weight": (inner, inner, 3, 3), **bn(f"{p}.bn2", inner),
                     f"{p}.conv3.weight": (out, inner, 1, 1), **bn(f"{p}.bn3", out)})
      if block == 0:
        shapes.update({f"{p}.downsample.0.weight": (out, in_channels, 1, 1), **bn(f"{p}.downsample.1", out)})
      in_channels = out
  if num_classes is not None:
    shapes.update({"fc.weight": (num_classes, in_channels), "fc.bias": (num_classes,)})
  return shapes


# Flax leaf (collection, name) -> torch state-dict suffix.
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def torch_key(module_path: Iterable[str], collection: str, leaf: str) -> str:
  """Flax ResNet path -> torchvision key, e.g. (layer1, block0, downsample_bn), batch_stats, var ->
  `layer1.0.downsample.1.running_var`."""
  parts = [p[len("block"):] if p.startswith("block") else _MODULE_NAMES.get(p, p) for p in module_path]
  return ".".join(parts + [_LEAF_NAMES[(collection, leaf)]])


def _to_flax(array: np.ndarray) -> np.ndarray:
  """torch layout -> Flax: conv OIHW -> HWIO, linear (out, in) -> (in, out); vectors unchanged."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def _port(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
          key_for: Callable[[Tuple[str, ...], str, str], Optional[str]], ignore: Callable[[str], bool],
          source: Optional[str]) -> Dict[str, Any]:
  """Replace every leaf of `variables` that `key_for` names with the converted state-dict entry.

  Raises WeightsError naming the file (`source`, else the path a `LoadedStateDict` remembers), the keys and
  both shapes for missing, unexpected (not `ignore`d) or mis-shaped entries. Leaves for which `key_for`
  returns None are kept as they are.
  """
  source = source or getattr(state_dict, "path", "state dict")
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  missing, wrong, used = [], [], set()
  for path, leaf in flat.items():
    key = key_for(path[1:-1], path[0], path[-1])
    if key is None:
      continue
    if key not in state_dict:
      missing.append(f"{key} (shape {_torch_shape(tuple(leaf.shape))})")
      continue
    used.add(key)
    value = np.asarray(state_dict[key])
    if _torch_shape(tuple(leaf.shape)) != value.shape:
      wrong.append(f"{key}: file has {value.shape}, model expects {_torch_shape(tuple(leaf.shape))} "
                   f"(Flax {'/'.join(path)} {tuple(leaf.shape)})")
      continue
    flat[path] = jnp.asarray(_to_flax(value), dtype=leaf.dtype)
  unexpected = [f"{k} {np.shape(v)}" for k, v in state_dict.items() if k not in used and not ignore(k)]
  problems = [(wrong, "mis-shaped"), (missing, "missing"), (unexpected, "unexpected")]
  message = "; ".join(f"{len(keys)} {what} key(s): {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}"
                      for keys, what in problems if keys)
  if message:
    raise WeightsError(f"{source}: the weights do not fit the model: {message}")
  return flax.traverse_util.unflatten_dict(flat)


def _ignored(key: str) -> bool:
  return key.endswith("num_batches_tracked")


def resnet_variables(state_dict: Mapping[str, np.ndarray], template: Optional[Mapping[str, Any]] = None, *,
                     depth: int = 50, source: Optional[str] = None) -> Dict[str, Any]:
  """torchvision ResNet state dict -> {'params', 'batch_stats'} of the project's torchvision-layout ResNet.

  `template` is the variable tree (or its `jax.eval_shape`) of the target ResNet; by default a torchvision
  ResNet of `depth` (`models.torchvision_resnet`), with `fc` when the state dict has one. `fc.*` in the file
  is ignored if the template has no `fc`.
  """
  if template is None:
    from laga_jax import models  # Deferred: the registry is only needed without a template.
    num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else None
    model = models.torchvision_resnet(depth, num_classes)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  has_fc = "fc" in template["params"]
  variables = {c: template[c] for c in ("params", "batch_stats")}
  return _port(state_dict, variables, torch_key,
               lambda k: _ignored(k) or (not has_fc and k.startswith("fc.")), source)


def port_state_dict(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                    key_for: Callable[[Tuple[str, ...], str, str], Optional[str]], *,
                    ignore_prefixes: Sequence[str] = (), source: Optional[str] = None) -> Dict[str, Any]:
  """Map a torch state dict onto Flax `variables` ({'params', 'batch_stats'}) with a model's key function.

  `key_for(module_path, collection, leaf)` names the torch key of a Flax leaf (None: keep the leaf as
  initialised; `torch_key` gives torchvision's naming). Entries starting with `ignore_prefixes` (e.g. "fc.")
  may be left unused. Errors name the file, the keys and both shapes.
  """
  prefixes = tuple(ignore_prefixes)
  return _port(state_dict, variables, key_for, lambda k: _ignored(k) or k.startswith(prefixes), source)


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m laga_jax.weights",
      description="Convert a torchvision ResNet checkpoint (.pth/.safetensors/.npz) into a torch-free "
                  ".npz or .safetensors state dict, after checking every key and shape against the ResNet.")
  parser.add_argument("source", help="torchvision weights, e.g. resnet50-0676ba61.pth")
  parser.add_argument("output", help="output file (.npz or .safetensors); use it as config.model.pretrained")
  parser.add_argument("--depth", type=int, default=50, help="ResNet depth the weights must fit (50/101/152)")
  args = parser.parse_args(argv)
  state_dict = load_state_dict(args.source)
  resnet_variables(state_dict, depth=args.depth)
  save_state_dict(args.output, state_dict)
  count = sum(int(np.prod(v.shape)) for k, v in state_dict.items() if not _ignored(k))
  print(f"wrote {args.output}: {len(state_dict)} tensors, {count:,} values "
        f"(ResNet-{args.depth} layout checked)")


if __name__ == "__main__":
  main(sys.argv[1:])
