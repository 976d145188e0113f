"""MGN, the Multiple Granularity Network (Wang et al., ACM MM 2018, "Learning Discriminative Features with
Multiple Granularities for Person Re-Identification"; the LAGA-Net paper's ref. [10]), as its public
reference code (seathiefwang/MGN-pytorch) builds it.

  trunk (shared)  stem, layer1, layer2, layer3 block 0
  p1 (global)     own copy of layer3 blocks 1.. and of layer4, stride 2  -> pool             -> zg_p1
  p2 (2 parts)    own copy of layer3 blocks 1.. and of layer4, stride 1  -> pool, 2 stripes  -> zg_p2, z0_p2, z1_p2
  p3 (3 parts)    own copy of layer3 blocks 1.. and of layer4, stride 1  -> pool, 3 stripes  -> zg_p3, z0..z2_p3

Each of the 8 pooled 2048-d vectors gets its own reduction (1x1 conv to 256, BN, ReLU) and its own ID
classifier. Heads are ordered as the reference returns them: the three whole-map features (g_p1, g_p2, g_p3),
then the stripes (p2_0, p2_1, p3_0, p3_1, p3_2). The retrieval feature is the 8 reduced features
concatenated (2048-d); the triplet loss uses the three whole-map ones (tap "global"). docs/models.md lists
where the reference code and this module differ from the paper.
"""

import functools
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import weights
from laga_jax.models.layers import BatchNorm, canonical_dtype
from laga_jax.models.resnet import Bottleneck, ResNet, ResNetStage, global_avg_pool, stage_sizes_for_depth

Dtype = Any

NAME = "mgn"
# Metric-loss taps, each (taps, B, D) float32: "global" = the three whole-map reduced features (the
# reference's triplet input), "reduced" = all eight reduced features, "pooled" = the eight 2048-d pooled
# vectors before the reduction.
FEATURE_TAPS = ("global", "reduced", "pooled")
FINGERPRINT_FIELDS = ("depth", "stage_sizes", "width", "part_stripes", "reduction_dim", "pool")
# The ImageNet-initialised part: the shared trunk and every branch's layer3/layer4 copies.
BACKBONE_PATTERN = r"^(backbone|p\d+)(/|$)"
POOLS = ("avg", "max")

# The reference's initialisation of the new layers: reduction conv kaiming_normal(fan_in), its BN weight
# N(1, 0.02) and bias 0; classifiers kaiming_normal(fan_out) with bias 0.
reduction_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
classifier_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def bn_scale_init(key: jax.Array, shape: Tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """N(1, 0.02): the reference's init of the reduction BatchNorm's weight."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def stripe_bounds(height: int, num_stripes: int) -> List[Tuple[int, int]]:
  """[start, end) rows of each horizontal stripe, as torch's adaptive pooling over rows chooses them.

  Stripe i covers rows floor(i H / n) .. ceil((i + 1) H / n) - 1. When n divides H (the 24-row maps of
  384x128 inputs) these are the reference's fixed pooling windows; otherwise neighbouring stripes overlap.
  """
  if not 1 <= num_stripes <= height:
    raise ValueError(f"{num_stripes} stripes (config.model.part_stripes) do not fit a feature map of "
                     f"{height} rows; use fewer stripes or a taller config.data.image_size")
  return [((i * height) // num_stripes, -((-(i + 1) * height) // num_stripes)) for i in range(num_stripes)]


def pool(x: jax.Array, kind: str) -> jax.Array:
  """(B, H, W, C) -> (B, C) float32: average or max over every position (the reference's `pool2d`)."""
  if kind == "avg":
    return global_avg_pool(x)
  return jnp.max(x, axis=(1, 2)).astype(jnp.float32)


class Layer3Tail(nn.Module):
  """A branch's own copy of res_conv4_2.. (Sec. 3.1): Bottlenecks `first`.. of layer3, stride 1."""

  # Blocks keep their torchvision index (`block1`, `block2`, ...), so weights port by name.

  num_blocks: int
  features: int
  first: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.first, self.num_blocks):
      x = Bottleneck(self.features, 1, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                     name=f"block{i}")(x, train)
    return x


class Branch(nn.Module):
  """One MGN branch (Sec. 3.1, Fig. 2): own layer3 tail and layer4 (stride 2 global, 1 in the part branches)."""

  stage_sizes: Sequence[int]
  width: int
  layer4_stride: int
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Layer3Tail(self.stage_sizes[2], self.width * 4, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                   name="layer3")(x, train)
    return ResNetStage(self.stage_sizes[3], self.width * 8, self.layer4_stride, dtype=self.dtype,
                       bn_axis_name=self.bn_axis_name, name="layer4")(x, train)


class Head(nn.Module):
  """One feature's reduction, 1x1 conv -> BN -> ReLU (Sec. 3.1), and its softmax classifier (Sec. 3.2)."""

  # Returns (reduced feature (B, reduction_dim), logits (B, num_classes)), float32.

  num_classes: int
  reduction_dim: int = 256
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, pooled: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
    # A 1x1 convolution on the pooled 1x1 map, as the reference applies it (same kernel layout for porting).
    x = nn.Conv(self.reduction_dim, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=reduction_kernel_init, name="conv")(pooled[:, None, None, :])[:, 0, 0, :]
    x = BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                  scale_init=bn_scale_init, name="bn")(x)
    feature = nn.relu(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=classifier_kernel_init, bias_init=nn.initializers.zeros,
                      name="classifier")(feature)
    return feature.astype(jnp.float32), logits.astype(jnp.float32)


class MGN(nn.Module):
  """Multiple Granularity Network (Sec. 3.1, Fig. 2); returns stacked per-head outputs (see `head_names`)."""

  # {"logits": (heads, B, C), "reduced": (heads, B, R), "global": (branches, B, R), "pooled": (heads, B, 2048)}
  # with heads = branches + sum(part_stripes) = 8 and branches = 1 + len(part_stripes) = 3 by default.

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  part_stripes: Sequence[int] = (2, 3)
  reduction_dim: int = 256
  pool: str = "avg"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @property
  def branch_names(self) -> Tuple[str, ...]:
    """p1 (global), then p2, p3, ... (one per entry of `part_stripes`), as the reference names them."""
    return tuple(f"p{i + 1}" for i in range(1 + len(self.part_stripes)))

  @property
  def head_names(self) -> Tuple[str, ...]:
    """Output order: the branches' whole-map features g_p1.., then each part branch's stripes top to bottom."""
    names = tuple(f"g_{b}" for b in self.branch_names)
    for branch, stripes in zip(self.branch_names[1:], self.part_stripes):
      names += tuple(f"{branch}_{i}" for i in range(stripes))
    return names

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    if self.pool not in POOLS:
      raise ValueError(f"MGN.pool={self.pool!r} (config.model.pool): expected one of {POOLS}")
    stage_sizes = tuple(self.stage_sizes)
    # The trunk is torchvision's ResNet up to the first block of layer3 (the reference's `backone`).
    trunk_sizes = stage_sizes[:2] + (1,) + stage_sizes[3:]
    x = ResNet(trunk_sizes, self.width, num_stages=3, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
               name="backbone")(images, train)["layer3"]
    branch = functools.partial(Branch, stage_sizes, self.width, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    pooled = {}
    maps = {}
    for i, name in enumerate(self.branch_names):
      maps[name] = branch(2 if i == 0 else 1, name=name)(x, train)
      pooled[f"g_{name}"] = pool(maps[name], self.pool)
    for name, stripes in zip(self.branch_names[1:], self.part_stripes):
      for i, (start, end) in enumerate(stripe_bounds(maps[name].shape[1], stripes)):
        pooled[f"{name}_{i}"] = pool(maps[name][:, start:end], self.pool)

    head = functools.partial(Head, self.num_classes, self.reduction_dim, dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name)
    reduced, logits = zip(*(head(name=f"head_{n}")(pooled[n], train) for n in self.head_names))
    reduced = jnp.stack(reduced)
    return {"logits": jnp.stack(logits), "reduced": reduced, "global": reduced[:len(self.branch_names)],
            "pooled": jnp.stack([pooled[n] for n in self.head_names])}


def eval_features(outputs: Mapping[str, jax.Array]) -> jax.Array:
  """(B, heads * R) retrieval feature: the reduced features concatenated in head order (the reference's
  `predict`, 8 x 256 = 2048-d; Sec. 3.1)."""
  reduced = outputs["reduced"]
  return jnp.transpose(reduced, (1, 0, 2)).reshape(reduced.shape[1], -1)


def default_config() -> ml_collections.ConfigDict:
  """MGN's `config.model` (reference-code defaults; docs/models.md)."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3)
  c.stage_sizes = ()           # overrides depth when non-empty (demo/tests: (1, 1, 1, 1))
  c.width = 64                 # base width of the ResNet (64 = torchvision)
  c.part_stripes = (2, 3)      # stripes of each part branch (paper: a 2-part and a 3-part branch)
  c.reduction_dim = 256        # reduced feature size (reference `--feats`)
  c.pool = "avg"               # "avg" (reference default `--pool avg`) or "max" (paper: global max pooling)
  c.dtype = "float32"          # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.pretrained = ""            # torchvision ResNet50 weights: .pth / .safetensors / .npz ("" = random init)
  c.init_from = ""             # a workdir whose checkpoint initialises every parameter it has
  return c


def _stage_sizes(model_cfg: ml_collections.ConfigDict) -> Tuple[int, ...]:
  return tuple(model_cfg.stage_sizes) or stage_sizes_for_depth(model_cfg.depth)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` for the first `config.model` field that cannot work."""
  from laga_jax.config_utils import check_model_common, fail
  check_model_common(model_cfg)
  m = model_cfg
  if not m.stage_sizes:
    if m.depth not in (50, 101, 152):
      fail("model.depth", m.depth, "one of 50, 101, 152")
  elif len(m.stage_sizes) != 4 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                          for s in m.stage_sizes):
    fail("model.stage_sizes", m.stage_sizes, "four positive block counts, e.g. (3, 4, 6, 3), or ()")
  for field in ("width", "reduction_dim"):
    value = m[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      fail(f"model.{field}", value, "a positive integer")
  stripes = tuple(m.part_stripes)
  if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in stripes):
    fail("model.part_stripes", m.part_stripes, "positive stripe counts, one per part branch, e.g. (2, 3)")
  if m.pool not in POOLS:
    fail("model.pool", m.pool, "one of " + ", ".join(map(repr, POOLS)))


def build(model_cfg: ml_collections.ConfigDict, num_classes: int, *, bn_axis_name: Optional[str] = None) -> MGN:
  """MGN from `config.model`; `bn_axis_name` synchronises BatchNorm over a device axis."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: the training split must have at least one identity")
  stage_sizes = _stage_sizes(model_cfg)
  if len(stage_sizes) != 4 or min(stage_sizes) < 1:
    raise ValueError(f"config.model.stage_sizes={stage_sizes}: expected 4 positive block counts")
  return MGN(num_classes=num_classes, stage_sizes=stage_sizes, width=model_cfg.width,
             part_stripes=tuple(model_cfg.part_stripes), reduction_dim=model_cfg.reduction_dim,
             pool=model_cfg.pool, dtype=canonical_dtype(model_cfg.dtype), bn_axis_name=bn_axis_name)


# --- weights ------------------------------------------------------------------------------------------------

def _torchvision_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """MGN path -> torchvision ResNet key: `backbone/...` is stem..layer3.0; each branch's layer3/layer4 copy
  takes torchvision's layer3/layer4 (the part branches' stride-1 layer4 has the same weights)."""
  head = module_path[0]
  if head == "backbone" or re.fullmatch(r"p\d+", head):
    return weights.torch_key(module_path[1:], collection, leaf)
  return None


def pretrained_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                         model_cfg: Optional[ml_collections.ConfigDict] = None, *,
                         source: Optional[str] = None) -> Dict[str, Any]:
  """Initialised MGN variables with the trunk and every branch copy set from a torchvision ResNet state dict,
  as the reference copies one ImageNet ResNet-50 into all of them; heads keep their initialisation and `fc`
  is ignored."""
  del model_cfg  # every MGN variant maps the same way
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _torchvision_key, ignore_prefixes=("fc.",), source=source)
  return {**variables, **ported}


# Head name -> the reference's (reduction module, ID classifier) names.
REFERENCE_HEADS = {
    "g_p1": ("reduction_0", "fc_id_2048_0"), "g_p2": ("reduction_1", "fc_id_2048_1"),
    "g_p3": ("reduction_2", "fc_id_2048_2"), "p2_0": ("reduction_3", "fc_id_256_1_0"),
    "p2_1": ("reduction_4", "fc_id_256_1_1"), "p3_0": ("reduction_5", "fc_id_256_2_0"),
    "p3_1": ("reduction_6", "fc_id_256_2_1"), "p3_2": ("reduction_7", "fc_id_256_2_2"),
}
# torchvision stage -> index in the reference's trunk Sequential (`backone`, the reference's spelling).
_REFERENCE_TRUNK = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}


def _reference_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """MGN path -> key of the reference's `MGN.state_dict()` (seathiefwang/MGN-pytorch, model/mgn.py)."""
  head, rest = module_path[0], module_path[1:]
  key = weights.torch_key(rest, collection, leaf)
  if head == "backbone":
    stage, _, tail = key.partition(".")
    if stage == "layer3":  # the trunk holds layer3's block 0 only, as the Sequential's last entry
      tail = tail.partition(".")[2]
    return f"backone.{_REFERENCE_TRUNK[stage]}.{tail}"
  if re.fullmatch(r"p\d+", head):
    stage, _, tail = key.partition(".")
    block, _, tail = tail.partition(".")
    if stage == "layer3":  # a branch's res_conv4 copy holds layer3 blocks 1.., re-indexed from 0
      return f"{head}.0.{int(block) - 1}.{tail}"
    return f"{head}.1.{block}.{tail}"
  reduction, classifier = REFERENCE_HEADS[head[len("head_"):]]
  module = {"conv": f"{reduction}.0", "bn": f"{reduction}.1", "classifier": classifier}[rest[0]]
  return f"{module}.{weights.torch_key((), collection, leaf)}"


def reference_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], *,
                        source: Optional[str] = None) -> Dict[str, Any]:
  """Every MGN variable from a state dict of the reference implementation's `MGN` (a checkpoint trained with
  it, or the fidelity fixture). Needs the reference's layout (part_stripes=(2, 3)); raises on missing,
  unexpected or mis-shaped keys."""
  heads = {k[len("head_"):] for k in variables["params"] if k.startswith("head_")}
  if heads != set(REFERENCE_HEADS):
    raise ValueError(f"reference_variables needs the reference's 8 heads {sorted(REFERENCE_HEADS)} "
                     f"(config.model.part_stripes=(2, 3)); the model has {sorted(heads)}")
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _reference_key, source=source)
  return {**variables, **ported}
