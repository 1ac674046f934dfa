"""Method notes the report states (metrics.json and report.md), and small formatting helpers they share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from openpi.latents.analysis.run.result import CollectionAnalysis

SPLIT_NOTE = (
    "success vs failure is compared at equal rollout steps (inference index i), among the episodes of a task still "
    "running at step i, within task: per task and step the success mean minus the failure mean over the episodes at "
    "risk, weighted by their number; tasks combined with weights ∝ their episode-steps at risk; only steps and tasks "
    "with both outcomes at risk contribute (the number at risk per step is in metrics.json success_split.at_risk). "
    "Successful episodes end early and drift / attention grow with the step, so a per-episode summary (its mean, or "
    "its normalised-progress profile, the secondary view --success-window progress) would differ by length alone. "
    "Interval: cluster-robust t over the contributing tasks (t with K − 1 df; one task: its episodes resampled); "
    "p-value from permuting success labels inside each task, Holm-adjusted over layers where a layer is picked; the "
    "pooled split is drawn beside it and is confounded by task when success rates differ between tasks; episodes "
    "that ended with an error are left out"
)
DRIFT_NOTE = (
    "centred_drift (the collection mean of the layer subtracted, each position compared with itself) is the "
    "headline drift; the uncentred drift can read a large change orthogonal to a shared high-norm direction as "
    "almost none. expert_1 drift is taken at the last captured denoising step (closest to the action): openpi "
    "draws fresh noise at every inference, so expert 1 at early denoising steps drifts by the noise alone"
)
TEXT_CF_NOTE = (
    "text_only prompt sensitivity compares only the positions whose token is the same under both prompts; with a "
    "blank counterfactual that is BOS alone, a one-position measure"
)


def cf_text_positions(res: CollectionAnalysis) -> dict[str, Any] | None:
    """How many text positions each text_only counterfactual rerun compared (mean, min, max, reruns)."""
    v = res.cf_text_positions
    return {"mean": float(np.mean(v)), "min": int(min(v)), "max": int(max(v)), "n_reruns": len(v)} if v else None


def fmt(x, nd=3) -> str:
    """``x`` with ``nd`` decimals, or "n/a" for None / NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"
