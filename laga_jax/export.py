"""`run.py --mode export`: the trained model as a TensorFlow SavedModel, a StableHLO artifact and ONNX.

One contract for every format: input `images`, uint8 `[N, H, W, 3]` RGB pixels at the model's image size
(`config.data.image_size`), N free; output `features`, float32 `[N, D]`: evaluation's retrieval feature
(model(x) + model(flipped x), L2-normalised), where x is the pixels / 255 normalised with the ImageNet mean
and std (the evaluation transform at the model's size). Resize other images to (H, W) before calling.

    <workdir>/export/saved_model/     TensorFlow SavedModel, signature `serving_default` (jax2tf)
    <workdir>/export/model.stablehlo  `jax.export` serialization: `jax.export.deserialize(data).call(images)`
    <workdir>/export/model.onnx       ONNX (jax2onnx; only with the `export` extra: pip install -e ".[export]")
    <workdir>/export/metadata.json    model id, image size, feature size, checkpoint, contract

The StableHLO and SavedModel are lowered for CPU, CUDA and TPU, so they run on any of them.
"""

import contextlib
import io
import itertools
import json
import logging
import pathlib
import shutil
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from laga_jax import inference

log = logging.getLogger("laga_jax")

EXPORT_DIR = "export"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
PLATFORMS = ("cpu", "cuda", "tpu")
INPUT_NAME, OUTPUT_NAME = "images", "features"
CONTRACT = {
    "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", "H", "W", 3],
              "meaning": "RGB pixels at the model's image size (H, W)"},
    "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", "D"],
               "meaning": "model(x) + model(flipped x), L2-normalised; x = (pixels / 255 - ImageNet mean) / std"},
}


def _batch_spec(image_size: Sequence[int]) -> jax.ShapeDtypeStruct:
  (batch,) = jax.export.symbolic_shape("N")
  return jax.ShapeDtypeStruct((batch, int(image_size[0]), int(image_size[1]), 3), jnp.uint8)


def export_stablehlo(serve: Callable, image_size: Sequence[int], path: pathlib.Path,
                     platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
  """Serialize `serve` (uint8 images -> features, parameters closed over) with a free batch size."""
  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(_batch_spec(image_size))
  path.write_bytes(exported.serialize())
  return exported


@contextlib.contextmanager
def _stablehlo_tensorflow_reads():
  """Inside: jax.export writes its StableHLO at the oldest version with StableHLO's widest compatibility.

  jax writes StableHLO of a version at most four weeks old, which a TensorFlow older than the jax cannot
  always read: jax 0.12 writes 1.18 and TensorFlow 2.21's `XlaCallModule` fails on it ("unsupported
  version"). The same module at the most compatible version is read by both. `jax.export` offers no
  option for it, so its (private) serialiser is wrapped for the duration; where that changes in a jax
  release, the default is kept (and the SavedModel check below reports a mismatch).
  """
  try:
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo
    original = _export._module_to_bytecode
    version = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.MAX)
  except (ImportError, AttributeError):
    yield
    return

  def to_bytecode(module):
    try:
      return _jax.mlir.serialize_portable_artifact(module, version, xla_bridge.get_backend().serialize_with_sdy)
    except Exception:  # noqa: BLE001 - a feature the old version cannot express: jax's own choice
      return original(module)

  _export._module_to_bytecode = to_bytecode
  try:
    yield
  finally:
    _export._module_to_bytecode = original


def export_saved_model(feature_fn: Callable, variables: Any, image_size: Sequence[int], path: pathlib.Path,
                       platforms: Sequence[str] = PLATFORMS) -> None:
  """A TensorFlow SavedModel whose `serving_default` maps `images` to `features`; the parameters are
  TF variables (not graph constants, which protobuf limits to 2 GB)."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  leaves, treedef = jax.tree_util.tree_flatten(variables)
  height, width = (int(v) for v in image_size)

  def serve(leaves_in, images):
    return inference.pixels_feature_fn(feature_fn, jax.tree_util.tree_unflatten(treedef, leaves_in))(images)

  converted = jax2tf.convert(serve, polymorphic_shapes=[None, f"(N, {height}, {width}, 3)"],
                             with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.leaves = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]

  @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT_NAME)],
               autograph=False)
  def serving_default(images):
    return {OUTPUT_NAME: converted(list(module.leaves), images)}

  module.serving_default = serving_default
  if path.exists():
    shutil.rmtree(path)
  with _stablehlo_tensorflow_reads():  # the module is serialised when the function is traced for saving
    tf.saved_model.save(module, str(path), signatures={"serving_default": serving_default})


def onnx_available() -> Optional[str]:
  """None when the ONNX converter and runtime are installed, else what to install."""
  import importlib.util
  missing = [name for name in ("jax2onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
  if missing:
    return f"{' and '.join(missing)} not installed (pip install -e \".[export]\")"
  return None


def _slices_suffice(params: dict) -> bool:
  """Whether `_max_pool_by_slices` computes this `reduce_window_max` exactly: no dilation, and every padded
  window still covers an input element on each side (padding < window)."""
  if any(d != 1 for d in tuple(params["base_dilation"]) + tuple(params["window_dilation"])):
    return False
  return all(lo < w and hi < w for (lo, hi), w in zip(params["padding"], params["window_dimensions"]))


def _max_pool_by_slices(x: jax.Array, params: dict) -> jax.Array:
  """`reduce_window_max` (e.g. ResNet's stem max pool) as the maximum of one strided slice per window
  offset: slices, concatenations and elementwise maxima, which every ONNX runtime has in any layout.

  Padding repeats the border element instead of -inf: a window that reaches into the padding also covers
  that border element, so its maximum is unchanged.
  """
  from jax import lax
  window, strides = params["window_dimensions"], params["window_strides"]
  for axis, (lo, hi) in enumerate(params["padding"]):
    if lo or hi:
      size = x.shape[axis]
      first = lax.slice_in_dim(x, 0, 1, axis=axis)
      last = lax.slice_in_dim(x, size - 1, size, axis=axis)
      x = lax.concatenate([first] * lo + [x] + [last] * hi, axis)
  result = None
  for offset in itertools.product(*(range(w) for w in window)):
    # Axes the window does not slide over (batch, channels) are taken whole: no arithmetic on free sizes.
    limit = [n if w == s == 1 else o + ((n - w) // s) * s + 1
             for o, n, w, s in zip(offset, x.shape, window, strides)]
    piece = lax.slice(x, offset, limit, strides)
    result = piece if result is None else lax.max(result, piece)
  return result


def _portable(closed: Any) -> Callable:
  """A function that replays `closed` (a ClosedJaxpr) primitive by primitive, with nested jit and custom
  derivative calls inlined, `stack` written as expand_dims + concatenate, `unstack` as slices and max pooling
  as strided slices: primitives the ONNX converter turns into operators every runtime supports. Replaying the
  traced program also keeps the converter off Flax's own functions."""
  from jax import lax
  from jax.extend import core as jcore

  inline = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
            "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}

  def run(jaxpr, consts, *args):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
      values = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in inline and inline[name] in eqn.params:
        inner = eqn.params[inline[name]]
        inner_jaxpr, inner_consts = (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
        outs = run(inner_jaxpr, inner_consts, *values)
      elif name == "stack":
        axis = eqn.params["axis"]
        outs = [lax.concatenate([lax.expand_dims(v, (axis,)) for v in values], axis)]
      elif name == "unstack":  # jax 0.12 traces this model with it (0.10 does not); jax2onnx 0.13.0 has no rule
        axis = eqn.params["axis"]
        outs = [lax.index_in_dim(values[0], i, axis, keepdims=False) for i in range(values[0].shape[axis])]
      elif name == "reduce_window_max" and _slices_suffice(eqn.params):
        outs = [_max_pool_by_slices(values[0], eqn.params)]
      else:
        outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def replay(images):
    return run(closed.jaxpr, closed.consts, images)[0]
  return replay


def export_onnx(serve: Callable, image_size: Sequence[int], path: pathlib.Path) -> None:
  """ONNX through jax2onnx, with a free batch size; the converter's own chatter is kept out of the log."""
  import jax2onnx
  spec = _batch_spec(image_size)
  closed = jax.make_jaxpr(serve)(spec)
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir", "onnxscript")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      model = jax2onnx.to_onnx(_portable(closed), inputs=[spec], model_name="laga_jax_features",
                               input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
  path.write_bytes(model.SerializeToString())


def export_extractor(extractor: "inference.FeatureExtractor", out_dir: pathlib.Path, *,
                     formats: Sequence[str] = ("saved_model", "stablehlo", "onnx")) -> dict:
  """Write the requested formats of a `FeatureExtractor.from_workdir` model into `out_dir`; returns the
  metadata written to `out_dir/metadata.json` (with the files written and, for a skipped ONNX, why)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  image_size = extractor.image_size
  serve = inference.pixels_feature_fn(extractor.feature_fn, extractor.variables)
  files, skipped = {}, {}
  if "stablehlo" in formats:
    export_stablehlo(serve, image_size, out_dir / inference.STABLEHLO_FILE)
    files["stablehlo"] = inference.STABLEHLO_FILE
    log.info("export: %s", out_dir / inference.STABLEHLO_FILE)
  if "saved_model" in formats:
    export_saved_model(extractor.feature_fn, extractor.variables, image_size, out_dir / SAVED_MODEL_DIR)
    files["saved_model"] = SAVED_MODEL_DIR
    log.info("export: %s", out_dir / SAVED_MODEL_DIR)
  if "onnx" in formats:
    missing = onnx_available()
    if missing is None:
      export_onnx(serve, image_size, out_dir / ONNX_FILE)
      files["onnx"] = ONNX_FILE
      log.info("export: %s", out_dir / ONNX_FILE)
    else:
      skipped["onnx"] = missing
      (out_dir / ONNX_FILE).unlink(missing_ok=True)
      log.info("export: no ONNX file: %s", missing)
  metadata = dict(extractor.metadata, files=files, skipped=skipped, platforms=list(PLATFORMS),
                  contract=CONTRACT, jax_version=jax.__version__)
  (out_dir / inference.METADATA_FILE).write_text(json.dumps(metadata, indent=2))
  return metadata


def export_workdir(config, workdir: str, *, formats: Sequence[str] = ("saved_model", "stablehlo", "onnx")) -> dict:
  """`run.py --mode export`: the trained model of `workdir` into `<workdir>/export/`."""
  extractor = inference.FeatureExtractor.from_workdir(workdir, config=config)
  out_dir = pathlib.Path(workdir).absolute() / EXPORT_DIR
  metadata = export_extractor(extractor, out_dir, formats=formats)
  print(f"exported {', '.join(metadata['files'])} to {out_dir}"
        + "".join(f"\n  {name} skipped: {why}" for name, why in metadata["skipped"].items()))
  return metadata
