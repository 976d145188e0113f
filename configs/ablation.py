"""Table III ablation on Market-1501: one config, the row chosen after a colon.

  python run.py --config configs/ablation.py:global --workdir runs/ablation_global
  python run.py --config configs/ablation.py:local  --workdir runs/ablation_local
  python run.py --config configs/ablation.py:cam    --workdir runs/ablation_cam
  python run.py --config configs/ablation.py:laga   --workdir runs/ablation_laga   # = configs/market.py

Rows are cumulative, as in the paper: Global; +Local; +CAM; +SAM-RPE (= LAGA-Net).
"""

from configs import market

ROWS = {
    "global": dict(use_local=False, use_cam=False, use_sam_rpe=False),
    "local": dict(use_local=True, use_cam=False, use_sam_rpe=False),
    "cam": dict(use_local=True, use_cam=True, use_sam_rpe=False),
    "laga": dict(use_local=True, use_cam=True, use_sam_rpe=True),
}


def get_config(row: str = "laga"):
  if row not in ROWS:
    raise ValueError(f"configs/ablation.py:{row}: expected one of {', '.join(ROWS)}")
  config = market.get_config()
  config.model.update(ROWS[row])
  return config
