"""The bf16 precision floor of the comparison metrics: what bfloat16 storage alone makes them read.

Hidden states are stored in bfloat16 by default (8 significant bits). A stored value x stands for any float32 state
within half a unit in the last place (ulp) of it, so a comparison metric cannot resolve differences below what
rounding alone produces. The floor of a metric at one layer is measured on a sample of that layer's stored states
(:func:`floors`): for each state x a pre-image ``x_pre = x + U(−½, ½) · ulp(x)`` (a float32 state that rounds to
x) is drawn from ``seed``, and the metric is computed between x_pre and x:

* ``prompt_sensitivity`` (‖a − b‖/‖a‖ per position): the median over positions of ‖x_pre − x‖ / ‖x_pre‖;
* ``drift`` (1 − cos per position): the median of 1 − cos(x_pre, x);
* ``centred_drift``: the same after subtracting the sample's mean state (centring removes the shared part, so the
  same rounding is a larger share of what is left).

A value at or below its floor is indistinguishable from storage rounding. Captures in float32 (CaptureSpec.dtype)
have no floor here (NaN: not applicable).
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLOOR_METRICS", "FLOOR_NOTE", "floors"]

FLOOR_METRICS = ("prompt_sensitivity", "drift", "centred_drift")
FLOOR_NOTE = (
    "bf16 precision floor: the metric between a stored bfloat16 state and a float32 pre-image that rounds to it "
    "(x + U(−½, ½)·ulp(x)), median over a sample of the layer's positions; values at or below it are "
    "indistinguishable from storage rounding"
)


def _ulp_bf16(x: np.ndarray) -> np.ndarray:
    """The bfloat16 unit in the last place at each value (8 significant bits: 2^(exponent − 7))."""
    a = np.abs(x)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a > 0, 2.0 ** (e - 7), 0.0)


def _one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1.0 - num / np.where(den > 0, den, np.nan)


def floors(states: np.ndarray, *, seed: int = 0, max_rows: int = 2048) -> dict[str, float]:
    """{metric: floor} of :data:`FLOOR_METRICS` from stored bf16 ``states`` [..., W] (values as read, any float
    dtype); rows with a zero norm are left out."""
    # Rows are picked before the float64 copy: the analysis hands over a whole read block (memory stays one block).
    rows = np.asarray(states).reshape(-1, np.shape(states)[-1])
    keep = np.flatnonzero(np.any(rows != 0, axis=-1))
    if not len(keep):
        return {m: float("nan") for m in FLOOR_METRICS}
    rng = np.random.default_rng(seed)
    if len(keep) > max_rows:
        keep = keep[rng.choice(len(keep), max_rows, replace=False)]
    x = rows[keep].astype(np.float64)
    pre = x + rng.uniform(-0.5, 0.5, x.shape) * _ulp_bf16(x)
    rel = np.linalg.norm(pre - x, axis=-1) / np.linalg.norm(pre, axis=-1)
    centre = pre.mean(0) if len(x) > 1 else np.zeros(x.shape[-1])
    return {
        "prompt_sensitivity": float(np.median(rel)),
        "drift": float(np.nanmedian(_one_minus_cos(pre, x))),
        "centred_drift": float(np.nanmedian(_one_minus_cos(pre - centre, x - centre))) if len(x) > 1 else float("nan"),
    }
