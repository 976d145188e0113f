"""LAGA-Net (paper Sec. III-C, Fig. 2): a ResNet trunk up to layer3, then four branches with layer4 each.

  global   layer4_global                       -> GAP                    -> g
  local    layer4_local                        -> 3 horizontal stripes   -> p0, p1, p2
  spatial  sam3 (SAM-RPE) -> layer4_spatial -> sam4 -> GAP               -> s
  channel  cam3 (CAM)     -> layer4_channel -> cam4 -> GAP               -> c

Each 2048-d vector gets a reduction head (FC -> BN -> LeakyReLU -> Dropout) and an ID classifier. The paper
gives every branch its own layer4 copy (default); `shared_layer4=True` applies one layer4 to every branch,
as the author's MBA-Net code does. Branches and heads are ordered p0..p{n-1}, global, spatial, channel.
"""

import functools
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import weights
from laga_jax.models import feature_maps
from laga_jax.models.attention import CAM, SAMRPE
from laga_jax.models.layers import BatchNorm, canonical_dtype
from laga_jax.models.resnet import ResNet, ResNetStage, global_avg_pool, stage_sizes_for_depth

Dtype = Any

NAME = "laga"
# Outputs a metric loss may use: the reduction head's stages (`post_dropout` is the paper's embedding, the
# default triplet feature) and the 2048-d pooled branch vectors.
FEATURE_TAPS = ("post_dropout", "pre_dropout", "pre_bn", "pooled")
# `config.model` fields that change the parameters' shapes or meaning (checkpoint fingerprint).
FINGERPRINT_FIELDS = ("depth", "stage_sizes", "width", "last_stride", "use_local", "num_stripes", "use_cam",
                      "use_sam_rpe", "shared_layer4", "reduction_dim", "cam_energy", "rpe")

# The author's ClassBlock init: reduction kaiming_normal(fan_out), BN1d weight N(1, 0.02) (`bn_scale_init`),
# classifier N(0, 1e-3); all biases 0.
reduction_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_kernel_init = nn.initializers.normal(stddev=0.001)


def bn_scale_init(key: jax.Array, shape: Tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """N(1, 0.02), the author's BatchNorm1d weight init."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def stripe_weights(height: int, num_stripes: int) -> np.ndarray:
  """(num_stripes, height) averaging matrix of torch's AdaptiveAvgPool2d((n, 1)) over rows.

  Stripe i averages rows floor(i H / n) .. ceil((i + 1) H / n) - 1 (they overlap when n does not divide H).
  """
  rows = np.arange(height)
  start = (np.arange(num_stripes) * height) // num_stripes
  end = -((-(np.arange(num_stripes) + 1) * height) // num_stripes)
  inside = (rows[None, :] >= start[:, None]) & (rows[None, :] < end[:, None])
  return inside / inside.sum(axis=1, keepdims=True)


def stripe_pool(x: jax.Array, num_stripes: int) -> jax.Array:
  """(B, H, W, C) -> (num_stripes, B, C): float32 means of horizontal stripes (the local branch's AP)."""
  weights = jnp.asarray(stripe_weights(x.shape[1], num_stripes), jnp.float32)
  return jnp.einsum("nh,bhc->nbc", weights, jnp.mean(x.astype(jnp.float32), axis=2))


class ReductionHead(nn.Module):
  """Reduction layer + ID classifier of one branch (the author's ClassBlock): returns (embedding, logits).

  embedding = Dropout(LeakyReLU(BN(FC(f)))), the learned embedding of eq. (9)/(11); logits = FC(embedding).
  """

  num_classes: int
  reduction_dim: int = 1024
  dropout: float = 0.5
  leaky_slope: float = 0.1
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  return_taps: bool = False   # also return {"pre_bn", "pre_dropout"} (metric-loss feature taps)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, ...]:
    x = nn.Dense(self.reduction_dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=reduction_kernel_init, bias_init=nn.initializers.zeros, name="reduction")(x)
    pre_bn = x
    x = BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                  scale_init=bn_scale_init, name="bn")(x)
    x = nn.leaky_relu(x, negative_slope=self.leaky_slope)
    pre_dropout = x
    embedding = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=classifier_kernel_init, bias_init=nn.initializers.zeros,
                      name="classifier")(embedding)
    if self.return_taps:
      taps = {"pre_bn": pre_bn.astype(jnp.float32), "pre_dropout": pre_dropout.astype(jnp.float32)}
      return embedding.astype(jnp.float32), logits.astype(jnp.float32), taps
    return embedding.astype(jnp.float32), logits.astype(jnp.float32)


class LAGANet(nn.Module):
  """Local-Aware Global Attention Network; `__call__` returns stacked per-head outputs (see `head_names`).

  Returns {"logits": (heads, B, num_classes), "embeddings": (heads, B, reduction_dim),
  "pooled": (heads, B, 2048)} and the metric-loss taps "post_dropout" (= "embeddings"), "pre_dropout",
  "pre_bn" (heads, B, reduction_dim), all float32. Disabled branches (`use_local`, `use_cam`, `use_sam_rpe`:
  Table III's ablation) have no parameters and no head.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  last_stride: int = 1
  use_local: bool = True
  num_stripes: int = 3
  use_cam: bool = True
  use_sam_rpe: bool = True
  shared_layer4: bool = False
  reduction_dim: int = 1024
  dropout: float = 0.5
  leaky_slope: float = 0.1
  cam_energy: str = "author"
  rpe: str = "diagonal"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @property
  def head_names(self) -> Tuple[str, ...]:
    """Branch names in output order: p0..p{n-1}, global, spatial, channel (those enabled)."""
    names = tuple(f"p{i}" for i in range(self.num_stripes)) if self.use_local else ()
    names += ("global",)
    names += ("spatial",) if self.use_sam_rpe else ()
    names += ("channel",) if self.use_cam else ()
    return names

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    if self.use_local and self.num_stripes < 1:
      raise ValueError(f"LAGANet.num_stripes={self.num_stripes} (config.model.num_stripes): expected >= 1")
    x3 = ResNet(self.stage_sizes, self.width, self.last_stride, num_stages=3, dtype=self.dtype,
                bn_axis_name=self.bn_axis_name, name="backbone")(images, train)["layer3"]
    stage = functools.partial(ResNetStage, self.stage_sizes[3], self.width * 8, self.last_stride,
                              dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    shared = stage(name="layer4") if self.shared_layer4 else None

    def layer4(branch: str) -> nn.Module:
      # The shared module is called once per branch, as the author's aliased layer4 is.
      return shared if shared is not None else stage(name=f"layer4_{branch}")

    sam = functools.partial(SAMRPE, rpe=self.rpe, dtype=self.dtype, bn_axis_name=self.bn_axis_name)
    cam = functools.partial(CAM, energy=self.cam_energy, dtype=self.dtype)

    # Application order (global/local, spatial, channel) fixes the order in which a shared layer4's BN
    # statistics are updated in train mode, as in the author's forward pass.
    pooled = {}
    x4 = layer4("global")(x3, train)
    pooled["global"] = global_avg_pool(x4)
    if self.use_local:
      local = x4 if self.shared_layer4 else layer4("local")(x3, train)
      for i, stripe in enumerate(stripe_pool(local, self.num_stripes)):
        pooled[f"p{i}"] = stripe
    if self.use_sam_rpe:
      s = sam(rel_length=max(x3.shape[1:3]), name="sam3")(x3, train)
      s = layer4("spatial")(s, train)
      pooled["spatial"] = global_avg_pool(sam(rel_length=max(s.shape[1:3]), name="sam4")(s, train))
    if self.use_cam:
      c = cam(name="cam4")(layer4("channel")(cam(name="cam3")(x3), train))
      pooled["channel"] = global_avg_pool(c)

    head = functools.partial(ReductionHead, self.num_classes, self.reduction_dim, self.dropout,
                             self.leaky_slope, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                             return_taps=True)
    embeddings, logits, taps = zip(*(head(name=f"head_{n}")(pooled[n], train) for n in self.head_names))
    embeddings = jnp.stack(embeddings)
    return {"logits": jnp.stack(logits), "embeddings": embeddings, "post_dropout": embeddings,
            "pre_dropout": jnp.stack([t["pre_dropout"] for t in taps]),
            "pre_bn": jnp.stack([t["pre_bn"] for t in taps]),
            "pooled": jnp.stack([pooled[n] for n in self.head_names])}


def eval_features(outputs: Dict[str, jax.Array]) -> jax.Array:
  """(B, heads * 2048) retrieval feature: the pooled branch vectors concatenated in head order."""
  pooled = outputs["pooled"]
  return jnp.transpose(pooled, (1, 0, 2)).reshape(pooled.shape[1], -1)


def maps(model: LAGANet, variables: Dict[str, Any], images: jax.Array, *,
         query_position: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """Where LAGA-Net looks (the registry's optional hook): the activation map of every branch's layer4, the
  SAM-RPE attention of sam3/sam4 (eq. 3; at `query_position` and averaged) and the CAM attention of
  cam3/cam4 (eq. 1), as `feature_maps.attention_maps` draws them."""
  return feature_maps.attention_maps(model, variables, images, query_position=query_position)


# The ImageNet-pretrained part: the trunk (stem..layer3 under `backbone`) and every layer4 copy. It trains
# at 0.1x the learning rate of the new layers (attention, heads; paper §IV-B).
BACKBONE_PATTERN = r"^(backbone|layer4[^/]*)(/|$)"


def is_backbone_path(path: Sequence[str]) -> bool:
  """Whether a parameter path (top-level module first) matches `BACKBONE_PATTERN`."""
  return re.search(BACKBONE_PATTERN, "/".join(path)) is not None


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays (or `jax.ShapeDtypeStruct`s)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def from_config(model_cfg: ml_collections.ConfigDict, num_classes: int, *,
                bn_axis_name: Optional[str] = None) -> LAGANet:
  """Build LAGA-Net from `config.model` (configs/base.py); `bn_axis_name` synchronises BatchNorm."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: the training split must have at least one identity")
  stage_sizes = tuple(model_cfg.stage_sizes) or stage_sizes_for_depth(model_cfg.depth)
  if len(stage_sizes) != 4 or min(stage_sizes) < 1:
    raise ValueError(f"config.model.stage_sizes={stage_sizes}: expected 4 positive block counts")
  return LAGANet(num_classes=num_classes, stage_sizes=stage_sizes, width=model_cfg.width,
                 last_stride=model_cfg.last_stride, use_local=model_cfg.use_local,
                 num_stripes=model_cfg.num_stripes, use_cam=model_cfg.use_cam,
                 use_sam_rpe=model_cfg.use_sam_rpe, shared_layer4=model_cfg.shared_layer4,
                 reduction_dim=model_cfg.reduction_dim, dropout=model_cfg.dropout,
                 leaky_slope=model_cfg.leaky_slope, cam_energy=model_cfg.cam_energy, rpe=model_cfg.rpe,
                 dtype=canonical_dtype(model_cfg.dtype), bn_axis_name=bn_axis_name)


build = from_config


def default_config() -> ml_collections.ConfigDict:
  """LAGA-Net's `config.model` (paper §III-C, Table I; docs/fidelity.md for paper-vs-author-code choices)."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3)
  c.stage_sizes = ()           # overrides depth when non-empty (tests: (1, 1, 1, 1))
  c.width = 64                 # base width of the ResNet (64 = torchvision)
  c.last_stride = 1            # layer4 stride: 1 (LAGA-Net) or 2 (torchvision)
  c.use_local = True           # local branch (Table III "+Local")
  c.num_stripes = 3            # horizontal stripes of the local branch
  c.use_cam = True             # CAM in the channel branch (Table III "+CAM")
  c.use_sam_rpe = True         # SAM-RPE in the spatial branch (Table III "+SAM-RPE")
  c.shared_layer4 = False      # False: 4 independent layer4 copies (paper); True: one shared (author code)
  c.reduction_dim = 1024       # head bottleneck width (paper 1024; author code 2048)
  c.dropout = 0.5
  c.leaky_slope = 0.1
  c.cam_energy = "author"      # "author": softmax(-XX^T); "paper": softmax(+XX^T)
  c.rpe = "diagonal"           # "diagonal" (author code), "axial", "none"
  c.dtype = "float32"          # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.pretrained = ""            # torchvision ResNet50 weights: .pth / .safetensors / .npz ("" = random init)
  c.init_from = ""             # a workdir whose checkpoint initialises every parameter it has
  return c


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` for the first `config.model` field that cannot work."""
  from laga_jax.config_utils import check_model_common, fail
  check_model_common(model_cfg)
  m = model_cfg
  if not m.stage_sizes:
    if m.depth not in (50, 101, 152):
      fail("model.depth", m.depth, "one of 50, 101, 152")
  elif not all(isinstance(s, int) and s > 0 for s in m.stage_sizes) or len(m.stage_sizes) != 4:
    fail("model.stage_sizes", m.stage_sizes, "four positive block counts, e.g. (3, 4, 6, 3), or ()")
  for field in ("width", "num_stripes", "reduction_dim"):
    value = m[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      fail(f"model.{field}", value, "a positive integer")
  if m.last_stride not in (1, 2):
    fail("model.last_stride", m.last_stride, "one of 1, 2")
  if not 0.0 <= m.dropout < 1.0:
    fail("model.dropout", m.dropout, "a probability in [0, 1)")
  if m.cam_energy not in ("author", "paper"):
    fail("model.cam_energy", m.cam_energy, "one of 'author', 'paper'")
  if m.rpe not in ("diagonal", "axial", "none"):
    fail("model.rpe", m.rpe, "one of 'diagonal', 'axial', 'none'")


def _torchvision_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """LAGA-Net path -> torchvision key: `backbone/...` is stem..layer3, every `layer4*` copy is layer4."""
  head, rest = module_path[0], module_path[1:]
  if head == "backbone":
    return weights.torch_key(rest, collection, leaf)
  if head == "layer4" or head.startswith("layer4_"):
    return weights.torch_key(("layer4",) + rest, collection, leaf)
  return None


def pretrained_variables(state_dict: Any, variables: Any, model_cfg: Optional[ml_collections.ConfigDict] = None,
                         *, source: Optional[str] = None) -> Dict[str, Any]:
  """Initialised LAGA-Net variables with the trunk (stem..layer3) and every layer4 copy set from a
  torchvision ResNet state dict; attention modules and heads keep their initialisation, `fc` is ignored."""
  del model_cfg  # every LAGA-Net variant maps the same way
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _torchvision_key, ignore_prefixes=("fc.",), source=source)
  return {**variables, **ported}
