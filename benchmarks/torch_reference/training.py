"""LAGA-Net training in PyTorch, as a user of the author's code with the paper's loss would write it.

* Loss (eq. 8): sum over the six heads of label-smoothed CE (eps 0.1, batch mean; the author's
  LabelSmoothingCrossEntropy) + beta * sum over heads of batch-hard triplet (margin 1.2, Euclidean, mean over
  anchors; the author's TripletLoss with MarginRankingLoss) on the heads' embeddings.
* `torch.optim.Adam(weight_decay=...)` (coupled L2 on every parameter), two groups: the backbone (stem..layer3
  and every layer4 copy) at 0.1x the learning rate, the new layers at 1x; the rate is set at each epoch's start
  (linear warm-up, then step decay; the author's lr_scheduler).

Imports torch and NumPy only.
"""

import pathlib
from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.torch_reference import model as model_lib
from benchmarks.torch_reference import spec as spec_lib


def label_smoothing_ce(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
  log_probs = F.log_softmax(logits, dim=-1)
  nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
  return ((1.0 - epsilon) * nll - epsilon * log_probs.mean(dim=-1)).mean()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
  n = features.shape[0]
  sq = features.pow(2).sum(dim=1, keepdim=True).expand(n, n)
  dist = (sq + sq.t()).addmm(features, features.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()
  same = labels[:, None] == labels[None, :]
  dist_ap = dist.masked_fill(~same, float("-inf")).max(dim=1)[0]   # the anchor is its own positive
  dist_an = dist.masked_fill(same, float("inf")).min(dim=1)[0]
  return F.margin_ranking_loss(dist_an, dist_ap, torch.ones_like(dist_an), margin=margin)


def laga_loss(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, spec: spec_lib.Spec):
  ce = sum(label_smoothing_ce(logits, labels, spec.label_smoothing) for logits in outputs["logits"])
  triplet = sum(batch_hard_triplet(e, labels, spec.triplet_margin) for e in outputs["embeddings"])
  return ce + spec.triplet_beta * triplet, ce, triplet


def build_model(spec: spec_lib.Spec, num_classes: Optional[int] = None) -> model_lib.LAGANet:
  return model_lib.LAGANet(num_classes or spec.num_classes, spec.stage_sizes, spec.width, spec.last_stride,
                           spec.num_stripes, spec.reduction_dim, spec.dropout, spec.leaky_slope, spec.image)


def make_optimizer(model: model_lib.LAGANet, spec: spec_lib.Spec) -> torch.optim.Adam:
  groups = [{"params": model.backbone_parameters(), "lr_mult": spec.backbone_lr_mult},
            {"params": model.new_parameters(), "lr_mult": 1.0}]
  return torch.optim.Adam(groups, lr=spec.lr, betas=(spec.b1, spec.b2), eps=spec.eps,
                          weight_decay=spec.weight_decay)


def set_epoch(optimizer: torch.optim.Optimizer, epoch: int, spec: spec_lib.Spec) -> float:
  lr = spec_lib.learning_rate(epoch, spec)
  for group in optimizer.param_groups:
    group["lr"] = lr * group["lr_mult"]
  return lr


def nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def run(spec: spec_lib.Spec, threads: int = 1) -> dict:
  """Train the reference for `spec.steps` steps from `spec_lib.initial_state_dict` (reproducible from NumPy
  alone, so no fixture stores it); returns the run in torch names (state dicts as NumPy).

  The synthetic weights, unlike the modules' own init, start every bias and gamma away from 0: a bias
  followed by BatchNorm has a zero gradient in exact arithmetic, and from 0 its Adam updates would be
  rounding noise, different in every framework; from a non-zero value the coupled L2 term drives them.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(spec.seed)
  model = build_model(spec)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  model.load_state_dict({k: torch.from_numpy(v) for k, v in spec_lib.initial_state_dict(shapes, spec.seed).items()})
  initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  optimizer = make_optimizer(model, spec)
  losses, ces, triplets, lrs = [], [], [], []
  model.train()
  for step, batch in enumerate(spec_lib.batches(spec)):
    lrs.append(set_epoch(optimizer, step // spec.steps_per_epoch, spec))
    optimizer.zero_grad(set_to_none=True)
    loss, ce, triplet = laga_loss(model(nchw(batch["image"])), torch.from_numpy(batch["label"]).long(), spec)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    ces.append(ce.item())
    triplets.append(triplet.item())
  model.eval()
  with torch.no_grad():
    features = model_lib.eval_features(model, nchw(spec_lib.eval_images(spec))).numpy()
  final = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return {"loss": np.array(losses), "ce": np.array(ces), "triplet": np.array(triplets), "lr": np.array(lrs),
          "features": features, "initial": initial, "final": final,
          "torch": torch.__version__, "threads": threads}


# --- the reference modules against the repository's fixtures (the author's modules' outputs) ---------------

def check_module_fixtures(fixtures_dir: pathlib.Path = spec_lib.ROOT / "tests" / "fixtures") -> Dict[str, float]:
  """Max relative errors of this file's CAM, SAM-RPE (eval, train, running statistics), ClassBlock,
  LS-CE and triplet against tests/fixtures/laga_*.npz."""
  errors: Dict[str, float] = {}

  def err(name, actual, expected):
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected)
    errors[name] = float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))

  for name in ("C64_H12_W4", "C64_H24_W8"):
    fx = np.load(fixtures_dir / f"laga_cam_{name}.npz")
    cam = model_lib.CAM()
    cam.load_state_dict({"gamma": torch.from_numpy(fx["gamma"])})
    with torch.no_grad():
      err(f"cam_{name}", cam(torch.from_numpy(fx["input"])), fx["output"])
  for name in ("author_C64_H8_W8", "author_C64_H12_W12", "generalised_C64_H12_W4", "generalised_C64_H24_W8"):
    fx = np.load(fixtures_dir / f"laga_sam_rpe_{name}.npz")
    sam = model_lib.SAMRPE(64, (fx["rel_rows"].shape[0] + 1) // 2)
    sam.load_state_dict({k: torch.from_numpy(fx[k]) for k in sam.state_dict()})
    x = torch.from_numpy(fx["input"])
    with torch.no_grad():
      err(f"sam_{name}_eval", sam.eval()(x), fx["output_eval"])
      err(f"sam_{name}_train", sam.train()(x), fx["output_train"])
    for key, value in sam.state_dict().items():
      if key.endswith(("running_mean", "running_var")):
        err(f"sam_{name}_{key}", value, fx[f"train_updated.{key}"])
  fx = np.load(fixtures_dir / "laga_heads_losses.npz")
  block = model_lib.ClassBlock(32, 5, 16, 0.5, 0.1).eval()
  block.load_state_dict({k: torch.from_numpy(fx[f"classblock.{k}"]) for k in block.state_dict()})
  with torch.no_grad():
    embedding, logits = block(torch.from_numpy(fx["classblock.input"]))
  err("classblock_embedding", embedding, fx["classblock.bottleneck_eval"])
  err("classblock_logits", logits, fx["classblock.logits_eval"])
  err("ls_ce", label_smoothing_ce(torch.from_numpy(fx["lsce.logits"]), torch.from_numpy(fx["lsce.labels"]).long(),
                                  0.1), fx["lsce.loss"])
  err("triplet", batch_hard_triplet(torch.from_numpy(fx["triplet.features"]),
                                    torch.from_numpy(fx["triplet.labels"]).long(), float(fx["triplet.margin"])),
      fx["triplet.raw.loss"])
  return errors
