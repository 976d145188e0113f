"""BoT training in PyTorch, as its reference code trains it (github.com/michuanhaohao/reid-strong-baseline,
`configs/softmax_triplet_with_center.yml`; never imported by the project).

* Model (`modeling/baseline.py`): the reference's ResNet (torchvision's Bottleneck, last stride 1, no ReLU
  after the stem's BatchNorm) -> GAP -> f_t -> BNNeck (BatchNorm1d, shift frozen at 0) -> f_i -> bias-free
  classifier. Train mode returns (logits, f_t); eval mode f_i. State-dict names `base.*`, `bottleneck.*`,
  `classifier.*`, as the reference's.
* Loss (`layers/__init__.py`, `make_loss_with_center`): CrossEntropyLabelSmooth(0.1) on the logits +
  TripletLoss(0.3) (Euclidean, batch-hard, MarginRankingLoss) on f_t + 5e-4 x CenterLoss on f_t, each in the
  reference's form (the center loss over the expanded distance matrix, clamped, / batch).
* Optimisers (`solver/build.py`, `engine/trainer.py`): `torch.optim.Adam` with one group per parameter (lr
  3.5e-4, weight decay 5e-4; BIAS_LR_FACTOR 1), the frozen BNNeck shift left out; the centers by
  `torch.optim.SGD(lr=0.5)` after their gradient is divided by the center-loss weight; WarmupMultiStepLR
  stepped at every epoch start.

Imports torch and NumPy only.
"""

import json
import pathlib
import warnings
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import model as model_lib
from benchmarks.torch_reference import spec as spec_lib
from benchmarks.torch_reference.training import nchw

CENTERS_KEY = spec_lib.CENTERS_KEY  # the centers in a run's state dicts (the reference's CenterLoss.centers)
FROZEN_KEYS = spec_lib.ZEROED_KEYS["bot"]  # requires_grad False in the reference: no optimiser sees it


class BoTNet(nn.Module):
  """The reference's `Baseline` with neck 'bnneck' and a ResNet of `stage_sizes` blocks at base `width`."""

  def __init__(self, num_classes: int, stage_sizes=(3, 4, 6, 3), width: int = 64, last_stride: int = 1):
    super().__init__()
    self.base = model_lib.ResNet(stage_sizes, width, last_stride, stem_relu=False)
    dim = width * 8 * 4
    self.bottleneck = nn.BatchNorm1d(dim)
    self.bottleneck.bias.requires_grad_(False)
    self.classifier = nn.Linear(dim, num_classes, bias=False)

  def forward(self, x: torch.Tensor):
    global_feat = F.adaptive_avg_pool2d(self.base(x), 1).flatten(1)
    feat = self.bottleneck(global_feat)
    if self.training:
      return self.classifier(feat), global_feat
    return feat


def label_smoothing_ce(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
  """CrossEntropyLabelSmooth: targets (1 - eps) onehot + eps / C, (-targets log p) mean over the batch."""
  log_probs = F.log_softmax(logits, dim=1)
  targets = torch.zeros_like(log_probs).scatter_(1, labels[:, None], 1)
  targets = (1 - epsilon) * targets + epsilon / logits.shape[1]
  return (-targets * log_probs).mean(0).sum()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
  """TripletLoss(margin): euclidean_dist (xx + yy - 2xy, clamped at 1e-12, sqrt) and hard_example_mining."""
  n = features.shape[0]
  sq = features.pow(2).sum(1, keepdim=True).expand(n, n)
  dist = (sq + sq.t()).addmm(features, features.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()
  is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
  dist_ap = dist[is_pos].contiguous().view(n, -1).max(1)[0]   # equal K per identity, as the reference needs
  dist_an = dist[~is_pos].contiguous().view(n, -1).min(1)[0]
  return F.margin_ranking_loss(dist_an, dist_ap, torch.ones_like(dist_an), margin=margin)


class CenterLoss(nn.Module):
  """The reference's CenterLoss: centers N(0, 1); sum_i ||x_i - c_{y_i}||^2 / B over the expanded distance
  matrix, every entry (the masked zeros too) clamped to [1e-12, 1e12]."""

  def __init__(self, num_classes: int, feat_dim: int):
    super().__init__()
    self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

  def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    batch, classes = x.shape[0], self.centers.shape[0]
    distmat = (x.pow(2).sum(1, keepdim=True).expand(batch, classes)
               + self.centers.pow(2).sum(1, keepdim=True).expand(classes, batch).t())
    distmat = distmat.addmm(x, self.centers.t(), beta=1, alpha=-2)
    mask = labels[:, None].expand(batch, classes).eq(torch.arange(classes).expand(batch, classes))
    return (distmat * mask.float()).clamp(min=1e-12, max=1e12).sum() / batch


def build(spec: spec_lib.BoTSpec, num_classes: int = 0) -> BoTNet:
  return BoTNet(num_classes or spec.num_classes, spec.stage_sizes, spec.width, spec.last_stride)


def state_dict_shapes(model: BoTNet, center: CenterLoss) -> Dict[str, tuple]:
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  shapes[CENTERS_KEY] = tuple(center.centers.shape)
  return shapes


def _state(model: BoTNet, center: CenterLoss) -> Dict[str, np.ndarray]:
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  state[CENTERS_KEY] = center.centers.detach().numpy().copy()
  return state


def run(spec: spec_lib.BoTSpec, threads: int = 1) -> dict:
  """Train BoT for `spec.steps` steps from the synthetic initial weights, the reference's update step by step;
  returns the run in torch names (state dicts as NumPy, the centers under `CENTERS_KEY`)."""
  torch.set_num_threads(threads)
  torch.manual_seed(spec.seed)
  model = build(spec)
  center = CenterLoss(spec.num_classes, spec.width * 8 * 4)
  shapes = state_dict_shapes(model, center)
  initial = spec_lib.initial_state_dict(shapes, spec.seed, zeroed=FROZEN_KEYS)  # the BNNeck shift stays 0
  model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items() if k != CENTERS_KEY})
  with torch.no_grad():
    center.centers.copy_(torch.from_numpy(initial[CENTERS_KEY]))
  groups = [{"params": [p], "lr": spec.lr, "weight_decay": spec.weight_decay}
            for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(groups)
  optimizer_center = torch.optim.SGD(center.parameters(), lr=spec.center_lr)
  # WarmupMultiStepLR: base lr x factor(last_epoch); the constructor takes step 0 and every epoch start one more.
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: spec_lib.bot_lr_factor(t, spec))
  # The reference steps the scheduler before the epoch's first optimiser step, which torch warns about.
  warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\(\)` before")
  series = {k: [] for k in ("loss", "ce", "triplet", "center", "lr")}
  model.train()
  for step, batch in enumerate(spec_lib.batches(spec)):
    if step % spec.steps_per_epoch == 0:
      scheduler.step()
    labels = torch.from_numpy(batch["label"]).long()
    optimizer.zero_grad()
    optimizer_center.zero_grad()
    score, feat = model(nchw(batch["image"]))
    ce = label_smoothing_ce(score, labels, spec.label_smoothing)
    triplet = batch_hard_triplet(feat, labels, spec.triplet_margin)
    center_loss = center(feat, labels)
    loss = ce + triplet + spec.center_weight * center_loss
    loss.backward()
    optimizer.step()
    for param in center.parameters():
      param.grad.data *= 1.0 / spec.center_weight
    optimizer_center.step()
    for key, value in (("loss", loss), ("ce", ce), ("triplet", triplet), ("center", center_loss)):
      series[key].append(value.item())
    series["lr"].append(optimizer.param_groups[0]["lr"])
  model.eval()
  with torch.no_grad():
    features = F.normalize(model(nchw(spec_lib.eval_images(spec))), dim=1, eps=1e-12).numpy()
  return {**{k: np.array(v) for k, v in series.items()}, "features": features, "initial": initial,
          "final": _state(model, center), "torch": torch.__version__, "threads": threads}


def check_fixture(path: pathlib.Path = spec_lib.ROOT / "tests" / "fixtures" / "bot_reference.npz") -> Dict[str, float]:
  """Max relative errors of `BoTNet` against the reference's own `Baseline` (tests/fixtures/bot_reference.npz:
  eval features before / after the BNNeck, train logits, f_t, f_i and running statistics)."""
  with np.load(path, allow_pickle=False) as data:
    fx = {k: data[k] for k in data.files}
  shapes = dict(zip(fx["keys"].tolist(), map(tuple, json.loads(str(fx["shapes"])))))
  state = spec_lib.initial_state_dict(shapes, int(fx["seed"]), zeroed=fx["zeroed_keys"].tolist())
  model = BoTNet(int(fx["num_classes"]), tuple(int(s) for s in fx["stage_sizes"]), 64, int(fx["last_stride"]))
  if sorted(model.state_dict()) != sorted(shapes):
    raise AssertionError("BoTNet's state-dict keys differ from the reference Baseline's")
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  x = torch.from_numpy(fx["input"])
  errors: Dict[str, float] = {}

  def err(name, actual, expected):
    actual = actual.detach().numpy()
    errors[name] = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))

  model.eval()
  with torch.no_grad():
    err("eval_post_bn", model(x), fx["eval_post_bn"])
    err("eval_pre_bn", F.adaptive_avg_pool2d(model.base(x), 1).flatten(1), fx["eval_pre_bn"])
  captured = {}
  hook = model.bottleneck.register_forward_hook(lambda module, inputs, output: captured.update(post_bn=output))
  model.train()
  with torch.no_grad():
    logits, global_feat = model(x)
  hook.remove()
  err("train_logits", logits, fx["train_logits"])
  err("train_pre_bn", global_feat, fx["train_pre_bn"])
  err("train_post_bn", captured["post_bn"], fx["train_post_bn"])
  for key, value in model.state_dict().items():
    if key.endswith(("running_mean", "running_var")):
      err(f"stats/{key}", value, fx[f"stats/{key}"])
  return errors
