"""MBA-Net (Baisa et al., "Multi-Branch with Attention Network for Hand-Based Person Recognition", ICPR 2022;
the LAGA-Net paper's ref. [39]), following its public reference code (`nathanlem1/MBA-Net`, `ResNet50_MBA`
with the training script's defaults `part_h = part_v = 1`, `use_attention`, `relative_pos`).

One ResNet-50 (last stride 1) whose *single* layer4 is applied three times, once per branch:

  global   layer4(x3)                         -> GAP -> g
  spatial  SAM-RPE(layer4(SAM-RPE(x3)))       -> GAP -> s       (LAGA-Net paper eq. 3-7)
  channel  CAM(layer4(CAM(x3)))               -> GAP -> c       (LAGA-Net paper eq. 1-2)

Each 2048-d vector gets a 2048-wide reduction head (FC -> BN -> LeakyReLU(0.1) -> Dropout(0.5) -> ID
classifier) trained with label-smoothed cross-entropy summed over the three heads; retrieval ranks the
concatenated pooled vectors [g, s, c] (6144-d; the evaluation adds the flipped image and L2-normalises).
Compared with LAGA-Net (`laga_net.py`), MBA-Net has no local (stripe) branch, shares layer4 between the
branches, and uses a 2048-d bottleneck; the CAM and SAM-RPE modules are the same (`attention.py`).
Divergences from the paper are listed in docs/models.md.
"""

import functools
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import config_utils, weights
from laga_jax.models import feature_maps
from laga_jax.models.attention import CAM, CAM_ENERGIES, RPE_MODES, SAMRPE
from laga_jax.models.laga_net import ReductionHead
from laga_jax.models.layers import canonical_dtype
from laga_jax.models.resnet import STAGE_SIZES, ResNet, ResNetStage, global_avg_pool, stage_sizes_for_depth

Dtype = Any

NAME = "mba"
# Outputs a metric loss may use (the reference trains with cross-entropy only): the reduction heads' stages
# ("post_dropout" feeds the classifiers; "pre_bn" is the FC output) and the 2048-d GAP vectors that are ranked.
FEATURE_TAPS = ("post_dropout", "pre_dropout", "pre_bn", "pooled")
# The torchvision ResNet-50 (stem..layer3 and the shared layer4) trains at the backbone rate (the reference's
# `model.backbone.parameters()` group at 0.1 x lr); attention modules and heads are new layers.
BACKBONE_PATTERN = r"^(backbone|layer4)/"
FINGERPRINT_FIELDS = ("depth", "stage_sizes", "width", "last_stride", "use_attention", "rpe", "cam_energy",
                      "reduction_dim", "leaky_slope")


def default_config() -> ml_collections.ConfigDict:
  """`config.model` of MBA-Net with the reference code's defaults."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3)
  c.stage_sizes = ()           # overrides depth when non-empty (demo/tests: (1, 1, 1, 1))
  c.width = 64                 # ResNet base width (64 = torchvision)
  c.last_stride = 1            # layer4 stride (reference: 1)
  c.use_attention = True       # spatial (SAM-RPE) and channel (CAM) branches; False = global branch only
  c.rpe = "diagonal"           # SAM-RPE relative terms: "diagonal" (reference), "axial", "none" (relative_pos=False)
  c.cam_energy = "author"      # "author": softmax(-XX^T) as the reference; "paper": softmax(+XX^T)
  c.reduction_dim = 2048       # ClassBlock bottleneck (reference default `num_bottleneck=2048`)
  c.dropout = 0.5
  c.leaky_slope = 0.1
  c.dtype = "float32"          # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.pretrained = ""            # torchvision ResNet-50 weights (.pth / .safetensors / .npz); "" = random init
  c.init_from = ""             # a workdir whose checkpoint initialises every matching parameter
  return c


class MBANet(nn.Module):
  """MBA-Net [39] (cf. LAGA-Net paper Sec. III-C without the local branch; one layer4 shared by all branches).

  Returns {"logits": (heads, B, num_classes), "pooled": (heads, B, 32 * width), and "post_dropout",
  "pre_dropout", "pre_bn": (heads, B, reduction_dim)}, float32, heads ordered global, spatial, channel.
  """

  num_classes: int
  stage_sizes: Sequence[int] = STAGE_SIZES[50]
  width: int = 64
  last_stride: int = 1
  use_attention: bool = True
  rpe: str = "diagonal"
  cam_energy: str = "author"
  reduction_dim: int = 2048
  dropout: float = 0.5
  leaky_slope: float = 0.1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @property
  def head_names(self) -> Tuple[str, ...]:
    """Branch names in output (and eval-feature) order, as the reference concatenates them."""
    return ("global", "spatial", "channel") if self.use_attention else ("global",)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    x3 = ResNet(self.stage_sizes, self.width, self.last_stride, num_stages=3, dtype=self.dtype,
                bn_axis_name=self.bn_axis_name, name="backbone")(images, train)["layer3"]
    # One module called once per branch: its BN statistics are updated three times per train step, in the
    # reference's order (global, spatial, channel).
    layer4 = ResNetStage(self.stage_sizes[3], self.width * 8, self.last_stride, dtype=self.dtype,
                         bn_axis_name=self.bn_axis_name, name="layer4")
    pooled = {"global": global_avg_pool(layer4(x3, train))}
    if self.use_attention:
      sam = functools.partial(SAMRPE, rpe=self.rpe, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
      s = sam(rel_length=max(x3.shape[1:3]), name="sam3")(x3, train)
      s = layer4(s, train)
      pooled["spatial"] = global_avg_pool(sam(rel_length=max(s.shape[1:3]), name="sam4")(s, train))
      cam = functools.partial(CAM, energy=self.cam_energy, dtype=self.dtype)
      pooled["channel"] = global_avg_pool(cam(name="cam4")(layer4(cam(name="cam3")(x3), train)))

    head = functools.partial(ReductionHead, self.num_classes, self.reduction_dim, self.dropout,
                             self.leaky_slope, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                             return_taps=True)
    embeddings, logits, taps = zip(*(head(name=f"head_{n}")(pooled[n], train) for n in self.head_names))
    return {"logits": jnp.stack(logits), "pooled": jnp.stack([pooled[n] for n in self.head_names]),
            "post_dropout": jnp.stack(embeddings), "pre_dropout": jnp.stack([t["pre_dropout"] for t in taps]),
            "pre_bn": jnp.stack([t["pre_bn"] for t in taps])}


def _stage_sizes(model_cfg: ml_collections.ConfigDict) -> Tuple[int, ...]:
  return tuple(model_cfg.stage_sizes) or stage_sizes_for_depth(model_cfg.depth)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` naming the first `--config.model.<field>` that cannot work."""
  config_utils.check_model_common(model_cfg)
  stage_sizes = tuple(model_cfg.stage_sizes)
  if stage_sizes:
    if len(stage_sizes) != 4 or not all(isinstance(s, int) and s >= 1 for s in stage_sizes):
      config_utils.fail("model.stage_sizes", stage_sizes, "4 positive block counts, or () to use model.depth")
  elif model_cfg.depth not in STAGE_SIZES:
    config_utils.fail("model.depth", model_cfg.depth, f"one of {sorted(STAGE_SIZES)} (or set model.stage_sizes)")
  # SAM-RPE needs >= 8 channels after layer3 (d_k = C / 8): 16 * width >= 8 always holds for width >= 1.
  if not isinstance(model_cfg.width, int) or isinstance(model_cfg.width, bool) or model_cfg.width < 1:
    config_utils.fail("model.width", model_cfg.width, "a positive integer (64 = torchvision)")
  if model_cfg.last_stride not in (1, 2):
    config_utils.fail("model.last_stride", model_cfg.last_stride, "1 (reference) or 2")
  if not isinstance(model_cfg.use_attention, bool):
    config_utils.fail("model.use_attention", model_cfg.use_attention, "True or False")
  if model_cfg.rpe not in RPE_MODES:
    config_utils.fail("model.rpe", model_cfg.rpe, "one of " + ", ".join(map(repr, RPE_MODES)))
  if model_cfg.cam_energy not in CAM_ENERGIES:
    config_utils.fail("model.cam_energy", model_cfg.cam_energy, "one of " + ", ".join(map(repr, CAM_ENERGIES)))
  if (not isinstance(model_cfg.reduction_dim, int) or isinstance(model_cfg.reduction_dim, bool)
      or model_cfg.reduction_dim < 1):
    config_utils.fail("model.reduction_dim", model_cfg.reduction_dim, "a positive integer (reference: 2048)")
  if not 0.0 <= model_cfg.dropout < 1.0:
    config_utils.fail("model.dropout", model_cfg.dropout, "a probability in [0, 1)")
  if model_cfg.leaky_slope < 0:
    config_utils.fail("model.leaky_slope", model_cfg.leaky_slope, "a slope >= 0 (reference: 0.1)")


def build(model_cfg: ml_collections.ConfigDict, num_classes: int, *,
          bn_axis_name: Optional[str] = None) -> MBANet:
  """MBA-Net from `config.model`; `bn_axis_name` synchronises BatchNorm over the data axis."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: the training split must have at least one identity")
  validate(model_cfg)
  return MBANet(num_classes=num_classes, stage_sizes=_stage_sizes(model_cfg), width=model_cfg.width,
                last_stride=model_cfg.last_stride, use_attention=model_cfg.use_attention, rpe=model_cfg.rpe,
                cam_energy=model_cfg.cam_energy, reduction_dim=model_cfg.reduction_dim,
                dropout=model_cfg.dropout, leaky_slope=model_cfg.leaky_slope,
                dtype=canonical_dtype(model_cfg.dtype), bn_axis_name=bn_axis_name)


def eval_features(outputs: Mapping[str, jax.Array]) -> jax.Array:
  """(B, heads * 2048): the pooled vectors [g, s, c] concatenated, as the reference ranks them."""
  pooled = outputs["pooled"]
  return jnp.transpose(pooled, (1, 0, 2)).reshape(pooled.shape[1], -1)


def maps(model: MBANet, variables: Mapping[str, Any], images: jax.Array, *,
         query_position: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """Where MBA-Net looks (the registry's optional hook): the shared layer4's activation map once per branch it
  serves (its calls, in `head_names` order), and the SAM-RPE / CAM attention maps (`feature_maps`)."""
  drawn = feature_maps.attention_maps(model, variables, images, query_position=query_position)
  calls = {f"act:layer4#{k}": f"act:layer4[{name}]" for k, name in enumerate(model.head_names)}
  if len(model.head_names) == 1:
    calls = {"act:layer4": f"act:layer4[{model.head_names[0]}]"}
  return {calls.get(name, name): value for name, value in drawn.items()}


# --- weights ------------------------------------------------------------------------------------------------

def _torchvision_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """MBA-Net path -> torchvision ResNet key: `backbone/...` is stem..layer3, `layer4/...` is layer4."""
  head, rest = module_path[0], module_path[1:]
  if head == "backbone":
    return weights.torch_key(rest, collection, leaf)
  if head == "layer4":
    return weights.torch_key(("layer4",) + rest, collection, leaf)
  return None


def pretrained_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                         model_cfg: Optional[ml_collections.ConfigDict] = None) -> Dict[str, Any]:
  """Initialised variables with stem..layer4 set from a torchvision ResNet state dict (`fc` ignored);
  attention modules and heads keep their initialisation."""
  del model_cfg  # the backbone layout is the template's
  ported = weights._port(state_dict, {c: variables[c] for c in ("params", "batch_stats")}, _torchvision_key,
                         lambda k: k.endswith("num_batches_tracked") or k.startswith("fc."), None)
  return {**variables, **ported}


# The reference model's state-dict names of our modules (`ResNet50_MBA`; a checkpoint it saved,
# e.g. `net_best.pth`, loads with `reference_variables`).
_REFERENCE_MODULES = {"sam3": "sam_att3", "sam4": "sam_att4", "cam3": "cam_att3", "cam4": "cam_att4",
                      "head_global": "reduction_g", "head_spatial": "reduction_s", "head_channel": "reduction_c"}
_REFERENCE_SUBMODULES = {
    ("query", "conv"): "query_conv.0", ("query", "bn"): "query_conv.1",
    ("key", "conv"): "key_conv.0", ("key", "bn"): "key_conv.1",
    ("value", "conv"): "value_conv.0", ("value", "bn"): "value_conv.1",
    ("rel_height_bn",): "bnormr", ("rel_width_bn",): "bnormc",
    ("reduction",): "add_block.0", ("bn",): "add_block.1", ("classifier",): "classifier.0",
}
# Parameters stored without a transpose (torch and Flax agree): the relative-position tables and gammas.
_REFERENCE_RAW = {"rel_height": "rel_rows", "rel_width": "rel_columns", "gamma": "gamma"}
# `ResNet50_MBA` registers layer2..4 and the avgpool again under alias names (`layer4s`, `backbone.layer2c`,
# ...); its state dict repeats those tensors under every alias.
_REFERENCE_ALIAS = re.compile(r"^(backbone\.)?(layer[234][sc]|avgpool[sc])\.")


def _reference_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  head, rest = module_path[0], module_path[1:]
  if head in ("backbone", "layer4"):
    return "backbone." + _torchvision_key(module_path, collection, leaf)
  if leaf in _REFERENCE_RAW and collection == "params" and not rest:
    return None  # set by `reference_variables` (2-D tables would be transposed as Linear weights)
  torch_leaf = weights.torch_key((), collection, leaf)
  return ".".join([_REFERENCE_MODULES[head], _REFERENCE_SUBMODULES[rest], torch_leaf])


def reference_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], *,
                        source: Optional[str] = None) -> Dict[str, Any]:
  """A state dict of the reference `ResNet50_MBA` (every parameter and BN statistic) -> MBA-Net variables.

  `variables` is an initialised tree (or its `jax.eval_shape`) of the same architecture; raises
  `weights.WeightsError` naming missing, unexpected or mis-shaped keys.
  """
  template = {c: variables[c] for c in ("params", "batch_stats")}
  raw_keys = {f"{_REFERENCE_MODULES[m]}.{name}": (m, leaf)
              for m in ("sam3", "sam4", "cam3", "cam4") if m in template["params"]
              for leaf, name in _REFERENCE_RAW.items() if leaf in template["params"][m]}
  ignore = lambda k: k.endswith("num_batches_tracked") or bool(_REFERENCE_ALIAS.match(k)) or k in raw_keys
  ported = weights._port(state_dict, template, _reference_key, ignore, source)
  for key, (module, leaf) in raw_keys.items():
    expected = tuple(template["params"][module][leaf].shape)
    if key not in state_dict:
      raise weights.WeightsError(f"{source or 'state dict'}: missing key {key} (shape {expected})")
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != expected:
      raise weights.WeightsError(f"{source or 'state dict'}: {key} has shape {value.shape}, the model "
                                 f"expects {expected} (SAM-RPE tables have 2 max(H, W) - 1 rows)")
    ported["params"][module][leaf] = jnp.asarray(value)
  return {**variables, **ported}
