"""The one vocabulary of stream points: where in a layer capture (`taps.Tap`) reads and interventions
(`intervention`) write.

Per layer l and expert, in the order the layer body reaches them:

  residual           — the expert's residual stream entering layer l (l = 0: the embedded input).
  head_out           — layer l's per-head attention output before the output projection, [.., tokens, heads, head_dim].
  attn_out           — layer l's attention output after the output projection, before the residual add.
  post_attn_residual — the residual stream after the attention block's residual add (before the FFN).
  ffn_hidden         — the FFN's hidden activations, the gated product gelu(gate) * up before the down projection,
                       [.., tokens, mlp_dim] (the FFN "neurons").
  mlp_out            — layer l's FFN output (after the down projection, before the residual add).
  modulation         — adaptive experts only (pi0.5's action expert): the adaRMS modulation of the layer's two norms,
                       [B, 2 (pre-attention, pre-FFN), 3 (scale, shift, gate), W]; per example, not per token.

A point is added here once (with its feature layout) and both capture and interventions know it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

StreamPoint = Literal["residual", "head_out", "attn_out", "post_attn_residual", "ffn_hidden", "mlp_out", "modulation"]


@dataclasses.dataclass(frozen=True)
class PointInfo:
    """What a stream point holds: its features per token ("width" or "heads": [heads, head_dim]), whether it has a
    token axis, and whether interventions may edit it."""

    features: Literal["width", "heads", "mlp", "modulation"]
    per_token: bool
    editable: bool


POINTS: dict[str, PointInfo] = {
    "residual": PointInfo("width", per_token=True, editable=True),
    "head_out": PointInfo("heads", per_token=True, editable=True),
    "attn_out": PointInfo("width", per_token=True, editable=True),
    "post_attn_residual": PointInfo("width", per_token=True, editable=True),
    "ffn_hidden": PointInfo("mlp", per_token=True, editable=True),
    "mlp_out": PointInfo("width", per_token=True, editable=True),
    "modulation": PointInfo("modulation", per_token=False, editable=False),
}
# What `taps.Tap(stream=)` may read, and what interventions (`stream=`) may edit.
TAP_POINTS: tuple[str, ...] = tuple(POINTS)
EDIT_POINTS: tuple[str, ...] = tuple(name for name, p in POINTS.items() if p.editable)


def feature_shape(
    point: str, *, width: int, num_heads: int, head_dim: int, mlp_dim: int | None = None
) -> tuple[int, ...]:
    """The per-token feature axes of an editable point for an expert of these sizes."""
    if POINTS[point].features == "mlp":
        if mlp_dim is None:
            raise ValueError(f"Stream point {point!r} needs the expert's FFN width (ExpertSizes.mlp_dim).")
        return (mlp_dim,)
    return (num_heads, head_dim) if POINTS[point].features == "heads" else (width,)


def feature_rank(point: str) -> int:
    return 2 if POINTS[point].features == "heads" else 1
