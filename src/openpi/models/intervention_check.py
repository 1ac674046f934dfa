"""Checks of an intervention operation against a model's `TokenLayout`, before anything compiles.

Each kind's `validate(check)` (in `intervention_kinds`) calls these; a failure is a ValueError naming the operation,
the problem and the fix.
"""

from __future__ import annotations

import dataclasses

from openpi.models import stream_points
from openpi.models.layout import JOINT_ONLY, Span, TokenLayout


@dataclasses.dataclass(frozen=True)
class Check:
    layout: TokenLayout
    num_steps: int
    batch: int
    where: str

    def fail(self, problem: str, fix: str):
        raise ValueError(f"{self.where}: {problem}. Fix: {fix}.")

    def layers(self, layers) -> tuple[int, ...]:
        depth = self.layout.depth
        if layers is not None:
            self.indices(layers, depth, "layers", f"this model has {depth} layers")
        return self.layout.layer_tuple(layers)

    def denoise_steps(self, steps) -> None:
        if steps is not None:
            self.indices(steps, self.num_steps, "denoise_steps", f"sampling runs {self.num_steps} steps")

    def indices(self, values, n: int, what: str, size: str) -> None:
        if not values:
            self.fail(f"{what} is empty", "pass None for all, or at least one index")
        bad = [v for v in values if not -n <= v < n]
        if bad:
            self.fail(f"{what} {bad} do not exist: {size}", f"use indices in 0..{n - 1} (negative counts from the end)")
        if len({v % n for v in values}) != len(values):
            self.fail(f"{what} {list(values)} repeat an index", "list each index once")

    def heads(self, heads) -> None:
        n = self.layout.experts[0].num_heads
        if heads is not None and (not heads or any(not 0 <= h < n for h in heads)):
            self.fail(f"heads={heads} do not exist (this model has {n} heads)", f"use heads in 0..{n - 1}")

    def feature(self, expert: int, stream: str) -> tuple[int, ...]:
        e = self.layout.experts[expert]
        return stream_points.feature_shape(
            stream, width=e.width, num_heads=e.num_heads, head_dim=e.head_dim, mlp_dim=e.mlp_dim
        )

    def expert_span(self, expert: int, tokens: Span) -> None:
        segments = self.layout.segments()
        own = ["all", *(k for k, v in segments.items() if v[0] == expert)]
        if isinstance(tokens, str):
            if tokens in segments and segments[tokens][0] != expert:
                self.fail(
                    f"{tokens!r} is a token segment of expert {segments[tokens][0]}, not expert {expert}",
                    f"edit expert {segments[tokens][0]}, or use one of {own} for expert {expert}",
                )
            if tokens not in own:
                self.fail(f"unknown token segment {tokens!r}", f"use one of {own} or (start, stop)")
            return
        n = self.layout.expert_len(expert)
        if not 0 <= tokens[0] < tokens[1] <= n:
            self.fail(
                f"tokens={tokens} is not a window of expert {expert}'s {n} tokens", f"use 0 <= start < stop <= {n}"
            )

    def joint_span(self, name: str, tokens: Span) -> None:
        known = ["all", *JOINT_ONLY, *self.layout.segments()]
        if isinstance(tokens, str):
            if tokens not in known:
                self.fail(f"{name}: unknown token segment {tokens!r}", f"use one of {known} or (start, stop)")
            return
        n = self.layout.joint_len
        if not 0 <= tokens[0] < tokens[1] <= n:
            self.fail(
                f"{name}={tokens} is not a window of the {n} joint tokens [prefix | suffix]",
                f"use 0 <= start < stop <= {n}",
            )

    def shape(self, what: str, value, allowed: list[tuple[int, ...]], form: str) -> None:
        shape = tuple(getattr(value, "shape", ()))
        if shape not in [tuple(a) for a in allowed]:
            self.fail(f"{what} has shape {list(shape)}", f"pass {form}: {' or '.join(str(list(a)) for a in allowed)}")
