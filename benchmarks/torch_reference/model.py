"""LAGA-Net in PyTorch: the reference the JAX port is compared against (never imported by the project).

* Backbone: torchvision's ResNet (its own `Bottleneck`, "v1.5"), rebuilt here with a base-width parameter so
  that tiny networks exist (torchvision fixes the width at 64); at width 64 it is torchvision's `resnet50`
  key for key and value for value (`check_matches_torchvision`). Last stride 1.
* Four branches after layer3 (paper Sec. III-C), each with its own copy of layer4:
    global   layer4_global -> GAP                                 -> g
    local    layer4_local  -> AdaptiveAvgPool2d((3, 1))           -> p0, p1, p2
    spatial  sam3 (SAM-RPE) -> layer4_spatial -> sam4 -> GAP      -> s
    channel  cam3 (CAM)     -> layer4_channel -> cam4 -> GAP      -> c
* CAM, SAM-RPE and the ClassBlock heads follow the author's MBA-Net modules, with their state-dict names
  (docs/fidelity.md): CAM = softmax(rowmax(E) - E); SAM-RPE normalises over keys and indexes R by the
  diagonal offset col(a) - row(a) + L - 1, L = max(H, W) (the non-square generalisation of docs/fidelity.md);
  ClassBlock = Linear -> BatchNorm1d -> LeakyReLU(0.1) -> Dropout -> Linear, returning the post-dropout
  embedding (the triplet's input) and the logits.

Outputs, like the JAX model: {"logits": (heads, B, C), "embeddings": (heads, B, R), "pooled": (heads, B, 2048)}
in head order p0, p1, p2, global, spatial, channel.
"""

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

HEADS_WITHOUT_STRIPES = ("global", "spatial", "channel")


def make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
  """torchvision's `ResNet._make_layer` for Bottlenecks (downsample = 1x1 conv + BN on the first block)."""
  downsample = None
  if stride != 1 or inplanes != planes * Bottleneck.expansion:
    downsample = nn.Sequential(conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                               nn.BatchNorm2d(planes * Bottleneck.expansion))
  layers = [Bottleneck(inplanes, planes, stride, downsample)]
  layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
  return nn.Sequential(*layers)


def torchvision_init(module: nn.Module) -> None:
  """torchvision ResNet's init: conv kaiming-normal (fan_out, relu), BN weight 1 and bias 0."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.constant_(m.weight, 1)
      nn.init.constant_(m.bias, 0)


class ResNet(nn.Module):
  """torchvision's Bottleneck ResNet with a base width: stem, `num_stages` stages, optional fc."""

  def __init__(self, stage_sizes: Sequence[int], width: int = 64, last_stride: int = 2, num_stages: int = 4,
               num_classes: Optional[int] = None, stem_relu: bool = True):
    super().__init__()
    self.stem_relu = stem_relu  # False: BoT's reference ResNet, whose stem has no ReLU before the max-pool
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = width
    self.num_stages = num_stages
    for i in range(num_stages):
      stride = 1 if i == 0 else (last_stride if i == 3 else 2)
      setattr(self, f"layer{i + 1}", make_layer(inplanes, width * 2**i, stage_sizes[i], stride))
      inplanes = width * 2**i * Bottleneck.expansion
    self.fc = nn.Linear(inplanes, num_classes) if num_classes is not None else None
    torchvision_init(self)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.bn1(self.conv1(x))
    x = self.maxpool(self.relu(x) if self.stem_relu else x)
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    if self.fc is not None:
      x = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return x


class CAM(nn.Module):
  """Channel attention (the author's CAM_module): gamma * softmax(rowmax(E) - E) X + x, E = X X^T."""

  def __init__(self):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    query = x.view(b, c, -1)
    energy = torch.bmm(query, query.permute(0, 2, 1))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, query).view(b, c, h, w)
    return self.gamma * out + x


def _embedding(c_in: int, c_out: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SAMRPE(nn.Module):
  """Spatial attention with relative positions (the author's SAM_module, generalised to H != W).

  out = gamma * (V A^T + bnormr(E_H) + bnormc(E_W)) + x with A = softmax over keys of Q^T K and
  E = V (P Q), P[a] = R[col(a) - row(a) + L - 1]; R_H = `rel_rows`, R_W = `rel_columns`, (2L - 1, C / 8).
  """

  def __init__(self, channels: int, rel_length: int):
    super().__init__()
    d_k = channels // 8
    self.rel_length = rel_length
    self.query_conv = _embedding(channels, d_k)
    self.key_conv = _embedding(channels, d_k)
    self.value_conv = _embedding(channels, channels)
    self.rel_rows = nn.Parameter(torch.randn(2 * rel_length - 1, d_k))
    self.rel_columns = nn.Parameter(torch.randn(2 * rel_length - 1, d_k))
    self.bnormr = nn.BatchNorm2d(channels)
    self.bnormc = nn.BatchNorm2d(channels)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    length = max(h, w)
    if length != self.rel_length:
      raise ValueError(f"SAMRPE built for L = {self.rel_length}, feature map {h}x{w}")
    n = h * w
    q = self.query_conv(x).view(b, -1, n)        # (B, d_k, N)
    k = self.key_conv(x).view(b, -1, n)
    v = self.value_conv(x).view(b, c, n)         # (B, C, N)
    energy = torch.bmm(q.permute(0, 2, 1), k)    # (B, N queries, N keys)
    attention = torch.softmax(energy, dim=-1)
    out = torch.bmm(v, attention.permute(0, 2, 1))
    positions = torch.arange(n)
    index = positions % w - positions // w + length - 1   # col(a) - row(a) + L - 1
    for rel, norm in ((self.rel_rows, self.bnormr), (self.rel_columns, self.bnormc)):
      p = rel[index]                                  # (N, d_k): P = I R
      term = torch.bmm(v, torch.matmul(p, q))         # V (P Q): (B, C, N)
      out = out + norm(term.view(b, c, h, w)).view(b, c, n)
    return self.gamma * out.view(b, c, h, w) + x


class ClassBlock(nn.Module):
  """The author's ClassBlock: add_block = Linear, BatchNorm1d, LeakyReLU, Dropout; classifier = Linear."""

  def __init__(self, in_features: int, num_classes: int, reduction_dim: int, dropout: float, slope: float):
    super().__init__()
    self.add_block = nn.Sequential(nn.Linear(in_features, reduction_dim), nn.BatchNorm1d(reduction_dim),
                                   nn.LeakyReLU(slope), nn.Dropout(p=dropout))
    self.classifier = nn.Sequential(nn.Linear(reduction_dim, num_classes))
    # The author's init: kaiming-normal (fan_out), BN1d weight N(1, 0.02), classifier N(0, 0.001), biases 0.
    nn.init.kaiming_normal_(self.add_block[0].weight, a=0, mode="fan_out")
    nn.init.zeros_(self.add_block[0].bias)
    nn.init.normal_(self.add_block[1].weight, 1.0, 0.02)
    nn.init.zeros_(self.add_block[1].bias)
    nn.init.normal_(self.classifier[0].weight, std=0.001)
    nn.init.zeros_(self.classifier[0].bias)

  def forward(self, x: torch.Tensor):
    embedding = self.add_block(x)
    return embedding, self.classifier(embedding)


class LAGANet(nn.Module):
  """The reference LAGA-Net; `forward(images NCHW)` -> stacked per-head outputs (module docstring)."""

  def __init__(self, num_classes: int, stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64,
               last_stride: int = 1, num_stripes: int = 3, reduction_dim: int = 1024, dropout: float = 0.5,
               leaky_slope: float = 0.1, image_size: Sequence[int] = (384, 128)):
    super().__init__()
    self.num_stripes = num_stripes
    self.backbone = ResNet(stage_sizes, width, num_stages=3)
    inplanes, planes = width * 8 * 2, width * 8
    for branch in ("global", "local", "spatial", "channel"):
      setattr(self, f"layer4_{branch}", make_layer(inplanes, planes, stage_sizes[3], last_stride))
      torchvision_init(getattr(self, f"layer4_{branch}"))
    # layer3 is 1/16 of the image; layer4 keeps it with last stride 1.
    h3, w3 = -(-image_size[0] // 16), -(-image_size[1] // 16)
    h4, w4 = (h3, w3) if last_stride == 1 else (-(-h3 // 2), -(-w3 // 2))
    self.sam3 = SAMRPE(inplanes, max(h3, w3))
    self.sam4 = SAMRPE(planes * 4, max(h4, w4))
    self.cam3, self.cam4 = CAM(), CAM()
    self.head_names = tuple(f"p{i}" for i in range(num_stripes)) + HEADS_WITHOUT_STRIPES
    for name in self.head_names:
      setattr(self, f"head_{name}", ClassBlock(planes * 4, num_classes, reduction_dim, dropout, leaky_slope))

  def pooled(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    x3 = self.backbone(images)
    out = {"global": F.adaptive_avg_pool2d(self.layer4_global(x3), 1).flatten(1)}
    stripes = F.adaptive_avg_pool2d(self.layer4_local(x3), (self.num_stripes, 1))
    for i in range(self.num_stripes):
      out[f"p{i}"] = stripes[:, :, i, 0]
    s = self.sam4(self.layer4_spatial(self.sam3(x3)))
    out["spatial"] = F.adaptive_avg_pool2d(s, 1).flatten(1)
    c = self.cam4(self.layer4_channel(self.cam3(x3)))
    out["channel"] = F.adaptive_avg_pool2d(c, 1).flatten(1)
    return out

  def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    pooled = self.pooled(images)
    embeddings, logits = zip(*(getattr(self, f"head_{n}")(pooled[n]) for n in self.head_names))
    return {"logits": torch.stack(logits), "embeddings": torch.stack(embeddings),
            "pooled": torch.stack([pooled[n] for n in self.head_names])}

  def backbone_parameters(self):
    """The ImageNet-pretrained part (stem..layer3, every layer4 copy): trained at 0.1x the learning rate."""
    return [p for n, p in self.named_parameters() if n.startswith(("backbone.", "layer4_"))]

  def new_parameters(self):
    return [p for n, p in self.named_parameters() if not n.startswith(("backbone.", "layer4_"))]


def eval_features(model: LAGANet, images: torch.Tensor) -> torch.Tensor:
  """Flip-averaged retrieval features: pooled(x) + pooled(flip x), concatenated in head order, L2-normalised."""
  def concat(x):
    return model(x)["pooled"].permute(1, 0, 2).reshape(x.shape[0], -1)

  summed = concat(images) + concat(torch.flip(images, dims=[3]))
  return F.normalize(summed, dim=1, eps=1e-12)


def check_matches_torchvision(seed: int = 0) -> float:
  """This ResNet at width 64 is torchvision's resnet50: same keys and shapes, and with torchvision's weights
  the same logits. Returns the largest absolute logit difference (raises if keys or shapes differ)."""
  import torchvision
  torch.manual_seed(seed)
  theirs = torchvision.models.resnet50(weights=None).eval()
  ours = ResNet((3, 4, 6, 3), 64, last_stride=2, num_classes=1000).eval()
  theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
  if [(k, tuple(v.shape)) for k, v in theirs_sd.items()] != [(k, tuple(v.shape)) for k, v in ours_sd.items()]:
    raise AssertionError("the reference ResNet's state dict differs from torchvision's resnet50")
  ours.load_state_dict(theirs_sd)
  x = torch.randn(2, 3, 64, 32)
  with torch.no_grad():
    return float((ours(x) - theirs(x)).abs().max())
