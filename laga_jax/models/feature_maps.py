"""Where a model looks, as (B, h, w) maps: what the registry's optional `maps` hook of a model returns.

* Activation maps (torchreid's `visactmap`, Zhou et al., "Omni-Scale Feature Learning", ICCV 2019): the
  channel-wise L2 norm of the last convolutional feature maps, here the output of every final ResNet stage
  (one per branch: LAGA-Net's four layer4 copies, MGN's three, BoT's and PCB's one; a stage called once per
  branch, as MBA-Net's shared layer4, gives one map per call). This is the default for every model.
* SAM-RPE spatial attention (LAGA-Net paper eq. 3): the softmax row of one query position (the centre of the
  map by default) and the mean over all query positions (how much each position is attended to).
* CAM channel attention (eq. 1): the channels' mean attention weight applied to the CAM output,
  |sum_c w_c y_c|.

Names: "act:<module path>" ("act:<path>#<k>" for the k-th call of a stage called several times),
"sam:<module>@query=<row>,<col>" / "sam:<module>@mean" and "cam:<module>".
"""

import functools
from typing import Dict, Optional, Sequence

import flax
import jax
import numpy as np

from laga_jax.models.attention import CAM, SAMRPE
from laga_jax.models.resnet import ResNetStage


@functools.partial(jax.jit, static_argnames=("model", "kinds"))
def _intermediates(model, variables: dict, images: jax.Array, kinds: tuple) -> dict:
  """The "intermediates" collection of an eval-mode forward pass: the outputs of the modules of `kinds`.

  One compiled program: applied eagerly, the forward pass compiled each of its ~150 operations on its own
  (7 of the 48 CPU seconds of a tiny demo run, most of them again when a process drew its figures).
  """
  def wanted(module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, kinds)

  _, state = model.apply(variables, images, train=False, capture_intermediates=wanted, mutable=["intermediates"])
  return state["intermediates"]


def _capture(model, variables: dict, images: jax.Array, kinds: tuple) -> Dict[str, list]:
  """{module path: [output of each call]} of the modules of `kinds`, and {path + "/attention": [...]}
  for the attention matrices they record (eval mode), as host arrays."""
  intermediates = jax.device_get(_intermediates(model, variables, images, kinds))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  out: Dict[str, list] = {}
  for path, value in flat.items():
    if path[-1] not in ("__call__", "attention"):
      continue
    name = "/".join(str(p) for p in path[:-1]) + ("/attention" if path[-1] == "attention" else "")
    out[name] = list(value) if isinstance(value, tuple) else [value]
  return out


def _final_stage_maps(captured: Dict[str, list], exclude: set) -> Dict[str, np.ndarray]:
  """Channel-wise L2 norms of the widest stage outputs (the final stages: layer4 and its copies)."""
  stages = {n: calls for n, calls in captured.items() if n not in exclude and not n.endswith("/attention")
            and calls[0].ndim == 4}
  widest = max((calls[0].shape[-1] for calls in stages.values()), default=0)
  maps: Dict[str, np.ndarray] = {}
  for name, calls in stages.items():
    if calls[0].shape[-1] != widest:
      continue
    for k, value in enumerate(calls):
      key = f"act:{name}" if len(calls) == 1 else f"act:{name}#{k}"
      maps[key] = np.linalg.norm(np.asarray(value, np.float32), axis=-1)
  return maps


def activation_maps(model, variables: dict, images: jax.Array, *,
                    query_position: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """The default `maps` hook: activation maps of the final ResNet stages of any model built from
  `laga_jax.models.resnet` (`query_position` is accepted for a uniform hook and unused)."""
  del query_position
  maps = _final_stage_maps(_capture(model, variables, images, (ResNetStage,)), set())
  if not maps:
    raise ValueError(f"{type(model).__name__} has no ResNet stage to draw activation maps of; give its model "
                     "module a `maps(model, variables, images, *, query_position=None)` hook "
                     "(laga_jax/models/__init__.py)")
  return maps


def attention_maps(model, variables: dict, images: jax.Array, *,
                   query_position: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """Activation maps plus the SAM-RPE and CAM attention maps of the models that have those modules.

  `query_position` (row, col) of the SAM-RPE query on each attention module's own feature map; default its
  centre. A position outside a module's map is an error naming the map's size.
  """
  captured = _capture(model, variables, images, (ResNetStage, CAM, SAMRPE))
  attention = {n[:-len("/attention")]: calls[0] for n, calls in captured.items() if n.endswith("/attention")}
  maps = _final_stage_maps(captured, set(attention))
  for name, att in attention.items():
    out = captured[name][0]
    b, h, w, c = out.shape
    if att.shape[-1] == h * w:          # SAM-RPE: (B, P, P) over positions
      row, col = (h // 2, w // 2) if query_position is None else (int(v) for v in query_position)
      if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"--query_position={row},{col}: outside the {h}x{w} map of {name} (rows 0..{h - 1}, "
                         f"columns 0..{w - 1})")
      maps[f"sam:{name}@query={row},{col}"] = np.asarray(att[:, row * w + col, :].reshape(b, h, w), np.float32)
      maps[f"sam:{name}@mean"] = np.asarray(att.mean(axis=1).reshape(b, h, w), np.float32)
    elif att.shape[-1] == c:            # CAM: (B, C, C) over channels
      weights = att.mean(axis=1)        # how much each channel is attended to
      maps[f"cam:{name}"] = np.abs(np.einsum("bhwc,bc->bhw", np.asarray(out, np.float32), weights))
  return maps
