"""PCB and PCB+RPP: Sun et al., "Beyond Part Models: Person Retrieval with Refined Part Pooling", ECCV 2018
(the LAGA-Net paper's ref. [9]). Internals follow the authors' public code (`syfafterzy/PCB_RPP_for_reID`).

  ResNet (last stride 1) -> T: (B, H, W, C)                                           Sec. 3.1, Fig. 2
  PCB   T -> p horizontal stripes, average-pooled -> g_1..g_p (C-d)                  Sec. 3.1
  RPP   a part classifier gives each column vector f of T a softmax over the p parts,
        g_i = p * mean over positions of P(P_i | f) f                                Sec. 3.2, eq. (1)-(2)
  head  g -> dropout -> one 1x1 conv (C -> 256, shared by the parts) -> BN -> ReLU -> h_i
        h_i -> classifier_i (FC) -> logits of part i                                 Sec. 3.1

Outputs (every array float32, parts first): "logits" (p, B, classes), "pooled" g (p, B, C), "pre_bn" (the
1x1 conv output, p, B, 256) and "reduced" h (p, B, 256). The retrieval feature is the authors': each g_i
L2-normalised, concatenated (p * C). `rpp=True` adds the part classifier (`part_classifier`) and nothing else,
so a PCB checkpoint initialises every other parameter of the RPP model (`config.model.init_from`).
"""

import functools
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import weights
from laga_jax.models.layers import BatchNorm, canonical_dtype
from laga_jax.models.resnet import ResNet, conv_kernel_init, stage_sizes_for_depth

Dtype = Any

NAME = "pcb"
FEATURE_TAPS = ("pooled", "pre_bn", "reduced")
BACKBONE_PATTERN = r"^backbone/"
FINGERPRINT_FIELDS = ("depth", "stage_sizes", "width", "last_stride", "num_parts", "reduction_dim", "rpp",
                      "rpp_dim", "rpp_center", "rpp_temperature")

# The authors' init: 1x1 convs kaiming-normal fan_out (`conv_kernel_init`), BN 1 / 0, classifiers N(0, 1e-3)
# with zero bias, part-classifier bias 0.
classifier_kernel_init = nn.initializers.normal(stddev=0.001)


def default_config() -> ml_collections.ConfigDict:
  """`config.model` of PCB (rpp=False) / PCB+RPP (rpp=True) with the paper's and the authors' defaults."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3)
  c.stage_sizes = ()           # overrides depth when non-empty (tests, demo: (1, 1, 1, 1))
  c.width = 64                 # ResNet base width (64 = torchvision); T has 32 * width channels
  c.last_stride = 1            # Sec. 3.1: layer4's down-sampling removed (24 x 8 map at 384 x 128)
  c.num_parts = 6              # p: the paper's 6 horizontal parts
  c.reduction_dim = 256        # the 1x1 conv's output: h is 256-d
  c.dropout = 0.5              # on g before the 1x1 conv (authors' code; also on T before RPP's classifier)
  c.rpp = False                # refined part pooling (Sec. 3.2) instead of uniform stripes
  c.rpp_dim = 256              # channels of T the part classifier sees: T averaged over groups of
                               # C / rpp_dim consecutive channels (authors' code); 32 * width = the paper's f
  c.rpp_center = True          # subtract T's spatial mean before the part classifier (authors' code)
  c.rpp_temperature = 1.0      # softmax(T * W^T f) (authors' `T`; the paper's eq. (1) has 1)
  c.dtype = "float32"          # compute dtype: "float32" or "bfloat16" (params stay float32)
  c.pretrained = ""            # torchvision ResNet weights: .pth / .safetensors / .npz ("" = random init)
  c.init_from = ""             # a workdir whose checkpoint initialises every matching parameter (RPP stage)
  return c


def stripe_windows(height: int, num_parts: int) -> Tuple[int, int]:
  """(stride, kernel) of the authors' stripe pooling over `height` rows: stride H // p, kernel H - (p-1) stride.

  Equal stripes when p divides H (24 rows -> 6 x 4); otherwise the windows overlap (8 rows -> kernel 3,
  stride 1), unlike torch's AdaptiveAvgPool2d.
  """
  stride = height // num_parts
  if stride < 1:
    raise ValueError(f"the feature map has {height} rows, fewer than config.model.num_parts={num_parts}; "
                     "use a taller config.data.image_size or fewer parts")
  return stride, height - (num_parts - 1) * stride


def stripe_pool(x: jax.Array, num_parts: int) -> jax.Array:
  """(B, H, W, C) -> (p, B, C) float32: average pooling over the authors' horizontal windows (Sec. 3.1)."""
  stride, kernel = stripe_windows(x.shape[1], num_parts)
  rows = np.arange(x.shape[1])
  start = np.arange(num_parts)[:, None] * stride
  weights_ = ((rows[None, :] >= start) & (rows[None, :] < start + kernel)) / kernel
  return jnp.einsum("ph,bhc->pbc", jnp.asarray(weights_, jnp.float32), jnp.mean(x.astype(jnp.float32), axis=2))


class Conv1x1(nn.Module):
  """A 1x1 convolution over the last axis of any-rank input (torch's Conv2d(k=1)): the reduction (Sec. 3.1)
  and RPP's part classifier (Sec. 3.2, eq. 1). Kernel (1, 1, in, out) as `nn.Conv`, computed as an einsum."""

  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


class RefinedPartPooling(nn.Module):
  """RPP (Sec. 3.2): eq. (1) part classifier softmax over parts per column vector, eq. (2) weighted pooling.

  As the authors' code: the classifier sees T after dropout, averaged over groups of channels to `rpp_dim`
  and centred by its spatial mean; the pooled part is `num_parts` x the mean of P(P_i|f) f over positions.
  Returns (g: (p, B, C) float32, part weights: (B, H, W, p) float32).
  """

  num_parts: int
  rpp_dim: int = 256
  center: bool = True
  temperature: float = 1.0
  dropout: float = 0.5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
    b, h, w, c = x.shape
    if c % self.rpp_dim:
      raise ValueError(f"config.model.rpp_dim={self.rpp_dim} must divide the backbone's {c} channels")
    y = nn.Dropout(self.dropout, deterministic=not train)(x.astype(jnp.float32))
    y = jnp.mean(y.reshape(b, h, w, self.rpp_dim, c // self.rpp_dim), axis=-1)
    if self.center:
      y = y - jnp.mean(y, axis=(1, 2), keepdims=True)
    scores = Conv1x1(self.num_parts, use_bias=True, dtype=self.dtype, name="part_classifier")(y)
    probs = jax.nn.softmax(self.temperature * scores.astype(jnp.float32), axis=-1)
    pooled = jnp.einsum("bhwp,bhwc->pbc", probs, x.astype(jnp.float32)) * (self.num_parts / (h * w))
    return pooled, probs


class PCB(nn.Module):
  """Part-based Convolutional Baseline (Sec. 3.1, Fig. 2), with RPP (Sec. 3.2) when `rpp`; see the module doc.

  Returns {"logits": (p, B, num_classes), "pooled": (p, B, C), "pre_bn": (p, B, R), "reduced": (p, B, R)}.
  RPP's part weights (B, H, W, p) are sown as intermediates/part_weights.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  last_stride: int = 1
  num_parts: int = 6
  reduction_dim: int = 256
  dropout: float = 0.5
  rpp: bool = False
  rpp_dim: int = 256
  rpp_center: bool = True
  rpp_temperature: float = 1.0
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    t = ResNet(self.stage_sizes, self.width, self.last_stride, num_stages=4, dtype=self.dtype,
               bn_axis_name=self.bn_axis_name, name="backbone")(images, train)["layer4"]
    if self.rpp:
      pooled, probs = RefinedPartPooling(self.num_parts, self.rpp_dim, self.rpp_center, self.rpp_temperature,
                                         self.dropout, dtype=self.dtype, name="rpp")(t, train)
      self.sow("intermediates", "part_weights", probs)
    else:
      pooled = stripe_pool(t, self.num_parts)
    z = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    # One 1x1 conv and one BN over the p x 1 map of column vectors: shared by the parts, and the BN statistics
    # are taken over batch and parts together (BatchNorm2d in the authors' code).
    pre_bn = Conv1x1(self.reduction_dim, dtype=self.dtype, name="reduction")(z)
    reduced = nn.relu(BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=self.dtype,
                                name="reduction_bn")(pre_bn))
    dense = functools.partial(nn.Dense, self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=classifier_kernel_init, bias_init=nn.initializers.zeros)
    logits = jnp.stack([dense(name=f"classifier{i}")(reduced[i]) for i in range(self.num_parts)])
    return {"logits": logits.astype(jnp.float32), "pooled": pooled.astype(jnp.float32),
            "pre_bn": pre_bn.astype(jnp.float32), "reduced": reduced.astype(jnp.float32)}


def eval_features(outputs: Mapping[str, jax.Array]) -> jax.Array:
  """(B, p * C): every g_i L2-normalised, concatenated part by part (the authors' retrieval feature, Sec. 3.1)."""
  pooled = outputs["pooled"]
  norms = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  pooled = pooled / jnp.maximum(norms, 1e-12)
  return jnp.transpose(pooled, (1, 0, 2)).reshape(pooled.shape[1], -1)


def _stage_sizes(model_cfg: ml_collections.ConfigDict) -> Tuple[int, ...]:
  return tuple(model_cfg.stage_sizes) or stage_sizes_for_depth(model_cfg.depth)


def build(model_cfg: ml_collections.ConfigDict, num_classes: int, *, bn_axis_name: Optional[str] = None) -> PCB:
  """PCB / PCB+RPP from `config.model`; `bn_axis_name` synchronises BatchNorm over devices."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: the training split must have at least one identity")
  return PCB(num_classes=num_classes, stage_sizes=_stage_sizes(model_cfg), width=model_cfg.width,
             last_stride=model_cfg.last_stride, num_parts=model_cfg.num_parts,
             reduction_dim=model_cfg.reduction_dim, dropout=model_cfg.dropout, rpp=model_cfg.rpp,
             rpp_dim=model_cfg.rpp_dim, rpp_center=model_cfg.rpp_center,
             rpp_temperature=model_cfg.rpp_temperature, dtype=canonical_dtype(model_cfg.dtype),
             bn_axis_name=bn_axis_name)


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` naming `--config.model.<field>` for the first value that cannot work."""
  from laga_jax.config_utils import check_model_common, fail
  check_model_common(model_cfg)
  m = model_cfg

  def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

  if not m.stage_sizes:
    if m.depth not in (50, 101, 152):
      fail("model.depth", m.depth, "one of 50, 101, 152 (Bottleneck ResNets), or set config.model.stage_sizes")
  elif len(m.stage_sizes) != 4 or not all(positive_int(s) for s in m.stage_sizes):
    fail("model.stage_sizes", m.stage_sizes, "four positive block counts, e.g. (3, 4, 6, 3), or ()")
  for field in ("width", "num_parts", "reduction_dim"):
    if not positive_int(m[field]):
      fail(f"model.{field}", m[field], "a positive integer")
  if m.last_stride not in (1, 2):
    fail("model.last_stride", m.last_stride, "1 (PCB, Sec. 3.1) or 2 (torchvision)")
  if isinstance(m.dropout, bool) or not isinstance(m.dropout, (int, float)) or not 0.0 <= m.dropout < 1.0:
    fail("model.dropout", m.dropout, "a probability in [0, 1)")
  for field in ("rpp", "rpp_center"):
    if not isinstance(m[field], bool):
      fail(f"model.{field}", m[field], "True or False")
  channels = 32 * m.width
  if not positive_int(m.rpp_dim) or channels % m.rpp_dim:
    fail("model.rpp_dim", m.rpp_dim, f"a positive divisor of the backbone's {channels} output channels "
                                     f"(256: authors' code; {channels}: the paper's full column vector)")
  t = m.rpp_temperature
  if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
    fail("model.rpp_temperature", t, "a positive number")


def _is_backbone(module_path: Sequence[str]) -> bool:
  return re.match(BACKBONE_PATTERN, "/".join(module_path) + "/") is not None


def _torchvision_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  return weights.torch_key(module_path[1:], collection, leaf) if _is_backbone(module_path) else None


def pretrained_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                         model_cfg: Optional[ml_collections.ConfigDict] = None, *,
                         source: Optional[str] = None) -> Dict[str, Any]:
  """Initialised variables with the backbone (stem..layer4) set from a torchvision ResNet state dict.

  The reduction, its BN, the classifiers and RPP's part classifier keep their initialisation; `fc.*` is
  ignored. Raises `laga_jax.weights.WeightsError` for missing or mis-shaped backbone entries.
  """
  del model_cfg  # the backbone's shape is read from `variables`
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _torchvision_key, ignore_prefixes=("fc.",), source=source)
  return {**variables, **ported}


# The authors' module names (reid/models/resnet.py, resnet_rpp.py) for our top-level modules.
_AUTHOR_MODULES = {"reduction": "local_conv", "reduction_bn": "feat_bn2d", "rpp": None}


def _author_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  head = module_path[0]
  if head == "backbone":
    return "base." + weights.torch_key(module_path[1:], collection, leaf)
  suffix = weights.torch_key((), collection, leaf)
  if head.startswith("classifier"):
    return f"instance{head[len('classifier'):]}.{suffix}"
  if head == "rpp":  # rpp/part_classifier
    return f"local_mask.{suffix}"
  return f"{_AUTHOR_MODULES[head]}.{suffix}"


def author_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], *,
                     source: Optional[str] = None) -> Dict[str, Any]:
  """Every variable set from a state dict of the authors' PCB / RPP model (`base.*`, `local_conv`,
  `feat_bn2d`, `instance{i}`, `local_mask`), e.g. one of their checkpoints or the fidelity fixture's.

  Their unused `base.fc.*` is ignored; any other key the model lacks is an error.
  """
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _author_key, ignore_prefixes=("base.fc.",), source=source)
  return {**variables, **ported}
