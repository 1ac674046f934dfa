"""Method notes the report states (metrics.json and report.md), and small formatting helpers they share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from openpi.latents.analysis.result import CollectionAnalysis

SPLIT_NOTE = (
    "success vs failure compares each episode's mean over the first n_inferences rollout steps (the fewest any "
    "episode of the split has): failed episodes run to max_steps while successful ones stop early, and per-step "
    "metrics such as drift grow with t, so whole-episode means would differ by length alone; episodes that ended "
    "with an error are left out"
)
DRIFT_NOTE = (
    "expert_1 drift is taken at the last captured denoising step (closest to the action): openpi draws fresh noise "
    "at every inference, so expert 1 at early denoising steps drifts by the noise alone"
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
