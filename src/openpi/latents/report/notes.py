"""Method notes the report states (metrics.json and report.md), and small formatting helpers they share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from openpi.latents.analysis.run.result import CollectionAnalysis

SPLIT_NOTE = (
    "success vs failure is compared within task (per task, success mean − failure mean, combined with weights ∝ the "
    "task's episodes; only tasks with both outcomes contribute; interval from a two-stage task/episode bootstrap; "
    "p-value from permuting success labels inside each task, Holm-adjusted over layers where a layer is picked); the "
    "pooled split is drawn beside it and is confounded by task when success rates differ between tasks. Each "
    "episode is summarised by normalised progress (its steps mapped onto equal progress bins; a 1-step episode fills "
    "every bin, so no episode length collapses the window); episodes that ended with an error are left out"
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
