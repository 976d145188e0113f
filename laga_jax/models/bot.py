"""BoT, the "strong baseline" of Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification" (CVPR workshops 2019; LAGA-Net's ref. [7]), as its reference code
(github.com/michuanhaohao/reid-strong-baseline, `modeling/baseline.py`) builds it:

  ResNet-50 (last stride 1) -> GAP -> f_t ("pre_bn", 2048-d) -> BNNeck -> f_i ("post_bn") -> FC -> logits

BNNeck (§3.5) is a BatchNorm whose shift is fixed at zero, followed by a bias-free classifier. The triplet
loss (and the optional center loss, §3.6) use f_t, the label-smoothed ID loss the logits of f_i, and
retrieval ranks f_i by cosine distance. The reference's ResNet has no ReLU between the stem's BatchNorm and
its max-pool (`stem_relu=False`, the default here, as its published numbers were trained; issues #4, #117
there). docs/models.md lists every choice and where it departs from the paper.
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from laga_jax import weights
from laga_jax.models.layers import BatchNorm, canonical_dtype
from laga_jax.models.resnet import EXPANSION, ResNet, stage_sizes_for_depth

Dtype = Any

NAME = "bot"
# f_t (after GAP, what the triplet and center losses see) and f_i (after the BNNeck, what is ranked).
FEATURE_TAPS = ("pre_bn", "post_bn")
# The ImageNet-pretrained ResNet (stem..layer4); BoT trains it at the same rate as the neck and classifier.
BACKBONE_PATTERN = r"^backbone(/|$)"
# `config.model` fields that change the parameters' shapes or meaning (checkpoint fingerprint).
FINGERPRINT_FIELDS = ("depth", "stage_sizes", "width", "last_stride", "stem_relu")
# Module names, chosen to mirror the reference's `Baseline` attributes (`base`, `bottleneck`, `classifier`).
_REFERENCE_NAMES = {"backbone": "base", "bnneck": "bottleneck", "classifier": "classifier"}

# The reference's `weights_init_classifier`: N(0, 0.001) for the bias-free ID classifier.
classifier_kernel_init = nn.initializers.normal(stddev=0.001)


class BoT(nn.Module):
  """The BoT network (paper §2 standard baseline, §3.4 last stride, §3.5 BNNeck): one head, both taps.

  `__call__(images, train)` -> {"logits": (1, B, num_classes), "pre_bn": (1, B, D), "post_bn": (1, B, D),
  "retrieval": (1, B, D)}, all float32, D = 32 x width (2048); "retrieval" is the tap named by
  `eval_feature` (what `eval_features` ranks).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  last_stride: int = 1
  stem_relu: bool = False
  eval_feature: str = "post_bn"
  dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    if self.eval_feature not in FEATURE_TAPS:
      raise ValueError(f"BoT.eval_feature={self.eval_feature!r} (config.model.eval_feature): expected one of "
                       f"{FEATURE_TAPS}")
    pre_bn = ResNet(self.stage_sizes, self.width, self.last_stride, num_stages=4, dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name, stem_relu=self.stem_relu,
                    name="backbone")(images, train)["pooled"]
    # The neck and the classifier are tiny: float32 whatever the backbone's compute dtype.
    post_bn = BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, dtype=jnp.float32,
                        use_bias=False, name="bnneck")(pre_bn)
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=classifier_kernel_init, name="classifier")(post_bn)
    taps = {"pre_bn": pre_bn[None], "post_bn": post_bn[None]}
    return {"logits": logits[None], **taps, "retrieval": taps[self.eval_feature]}


def eval_features(outputs: Mapping[str, jax.Array]) -> jax.Array:
  """(B, 2048) retrieval feature: the BNNeck output f_i (or f_t with `eval_feature="pre_bn"`), un-normalised."""
  return outputs["retrieval"][0]


def feature_dim(model_cfg: ml_collections.ConfigDict) -> int:
  """Width of both taps and of the retrieval feature: layer4's channels (2048 for ResNet-50)."""
  return EXPANSION * 8 * model_cfg.width


def _stage_sizes(model_cfg: ml_collections.ConfigDict) -> Tuple[int, ...]:
  return tuple(model_cfg.stage_sizes) or stage_sizes_for_depth(model_cfg.depth)


def build(model_cfg: ml_collections.ConfigDict, num_classes: int, *, bn_axis_name: Optional[str] = None) -> BoT:
  """BoT from `config.model` (`default_config`); `bn_axis_name` synchronises BatchNorm over devices."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: the training split must have at least one identity")
  stage_sizes = _stage_sizes(model_cfg)
  if len(stage_sizes) != 4 or min(stage_sizes) < 1:
    raise ValueError(f"config.model.stage_sizes={stage_sizes}: expected 4 positive block counts")
  return BoT(num_classes=num_classes, stage_sizes=stage_sizes, width=model_cfg.width,
             last_stride=model_cfg.last_stride, stem_relu=model_cfg.stem_relu,
             eval_feature=model_cfg.eval_feature, dtype=canonical_dtype(model_cfg.dtype),
             bn_axis_name=bn_axis_name)


def default_config() -> ml_collections.ConfigDict:
  """BoT's `config.model` as its reference code sets it (`config/defaults.py`, configs/softmax_triplet*.yml)."""
  c = ml_collections.ConfigDict()
  c.name = NAME
  c.depth = 50                 # ResNet depth: 50 -> blocks (3, 4, 6, 3) (the published row)
  c.stage_sizes = ()           # overrides depth when non-empty (tests, demo: (1, 1, 1, 1))
  c.width = 64                 # base width of the ResNet (64 = torchvision)
  c.last_stride = 1            # layer4 stride: 1 (BoT §3.4) or 2 (torchvision)
  c.stem_relu = False          # False: the reference's ResNet (no ReLU after the stem BN); True: torchvision's
  c.eval_feature = "post_bn"   # ranked feature: "post_bn" (BNNeck output, reference TEST.NECK_FEAT 'after')
                               # or "pre_bn" ('before')
  c.dtype = "float32"          # compute dtype of the backbone: "float32" or "bfloat16" (params stay float32)
  c.pretrained = ""            # torchvision ResNet-50 weights: .pth / .safetensors / .npz ("" = random init)
  c.init_from = ""             # a workdir whose checkpoint initialises every parameter it has
  return c


def validate(model_cfg: ml_collections.ConfigDict) -> None:
  """Raise `ConfigError` for the first `config.model` field that cannot work."""
  from laga_jax.config_utils import check_model_common, fail
  check_model_common(model_cfg)
  m = model_cfg
  if not m.stage_sizes:
    if m.depth not in (50, 101, 152):
      fail("model.depth", m.depth, "one of 50, 101, 152 (Bottleneck ResNets), or set model.stage_sizes")
  elif len(m.stage_sizes) != 4 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                          for s in m.stage_sizes):
    fail("model.stage_sizes", m.stage_sizes, "four positive block counts, e.g. (3, 4, 6, 3), or ()")
  if isinstance(m.width, bool) or not isinstance(m.width, int) or m.width <= 0:
    fail("model.width", m.width, "a positive integer")
  if m.last_stride not in (1, 2) or isinstance(m.last_stride, bool):
    fail("model.last_stride", m.last_stride, "one of 1, 2")
  if not isinstance(m.stem_relu, bool):
    fail("model.stem_relu", m.stem_relu, "True or False")
  if m.eval_feature not in FEATURE_TAPS:
    fail("model.eval_feature", m.eval_feature, "one of " + ", ".join(map(repr, FEATURE_TAPS)))


# --- weights ------------------------------------------------------------------------------------------------

def _torchvision_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """BoT path -> torchvision ResNet key: `backbone/...` is the whole ResNet; the neck and classifier are new."""
  if module_path[0] == "backbone":
    return weights.torch_key(module_path[1:], collection, leaf)
  return None


def pretrained_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any],
                         model_cfg: Optional[ml_collections.ConfigDict] = None, *,
                         source: Optional[str] = None) -> Dict[str, Any]:
  """Initialised BoT variables with the ResNet (stem..layer4) set from a torchvision ResNet state dict.

  The BNNeck and the classifier keep their initialisation (scale 1; N(0, 0.001)); torchvision's `fc` is
  ignored. With `stem_relu=False` the ImageNet weights feed a stem without its ReLU, as in the reference.
  """
  del model_cfg  # every BoT variant maps the same way
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _torchvision_key, ignore_prefixes=("fc.",), source=source)
  return {**variables, **ported}


def _reference_key(module_path: Tuple[str, ...], collection: str, leaf: str) -> Optional[str]:
  """BoT path -> key of the reference's `Baseline.state_dict()` (`base.*`, `bottleneck.*`, `classifier.*`)."""
  head, rest = module_path[0], module_path[1:]
  if head == "backbone":
    return "base." + weights.torch_key(rest, collection, leaf)
  if head in _REFERENCE_NAMES:
    return ".".join((_REFERENCE_NAMES[head], weights.torch_key((), collection, leaf)))
  return None


def reference_variables(state_dict: Mapping[str, np.ndarray], variables: Mapping[str, Any], *,
                        source: Optional[str] = None) -> Dict[str, Any]:
  """Every BoT variable from a state dict of the reference's `Baseline` (BNNeck, same depth and classes).

  Reads a model trained with the reference code (e.g. its released Market-1501 weights, loaded with
  `laga_jax.weights.load_state_dict`). The reference keeps `bottleneck.bias` frozen at zero; a non-zero one
  cannot be represented here and raises `WeightsError`.
  """
  name = source or getattr(state_dict, "path", "state dict")
  bias = state_dict.get("bottleneck.bias")
  if bias is not None and np.any(np.asarray(bias) != 0):
    raise weights.WeightsError(f"{name}: bottleneck.bias is not zero (max |b| = {np.abs(bias).max():.3g}); "
                               "BoT's BNNeck keeps its shift frozen at zero and has no bias parameter here")
  ported = weights.port_state_dict(state_dict, {c: variables[c] for c in ("params", "batch_stats")},
                                   _reference_key, ignore_prefixes=("bottleneck.bias",), source=name)
  return {**variables, **ported}
