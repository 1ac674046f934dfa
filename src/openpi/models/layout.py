"""The token-segment layout of a model family: which positions hold each camera's image tokens, the text, the state
and the actions, which experts run in which pass, and the sizes an edit must fit.

Capture, interventions, the collection's manifest and the analysis read a `TokenLayout` (`Pi0Config.layout`,
`Pi0.layout`) instead of asking pi0's config for its numbers, so a new family (pi0-FAST, ...) states its layout once.
Pure Python: this module imports nothing from `openpi`.

pi0 / pi0.5: expert 0 (PaliGemma) runs once per inference, in the prefix pass [camera 0 | camera 1 | ... | text],
which fills the KV cache; expert 1 (the action expert) runs at every denoising step over the suffix (pi0: [state |
actions], pi0.5: [actions]) reading that cache. Token spans are named segments or (start, stop) windows over an
expert's own tokens; the joint sequence is [prefix | suffix].
"""

from __future__ import annotations

import dataclasses

Span = str | tuple[int, int]
JOINT_ONLY = ("prefix", "suffix")


@dataclasses.dataclass(frozen=True)
class ExpertSizes:
    width: int
    num_heads: int
    head_dim: int
    mlp_dim: int | None = None  # the FFN hidden width (stream "ffn_hidden"); None: the family has no FFN neurons


@dataclasses.dataclass(frozen=True)
class StepAxis:
    """One pass of an inference: `name`, the experts that run in it, and whether it repeats (`steps` per inference:
    "once" or "num_steps", the sampler's argument)."""

    name: str
    experts: tuple[int, ...]
    steps: str


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Token positions and sizes of one model config (hashable: a static jit argument)."""

    cameras: tuple[str, ...]
    tokens_per_camera: int
    max_token_len: int
    # Expert 1's named segments over its own tokens: (name, start, stop).
    suffix_segments: tuple[tuple[str, int, int], ...]
    suffix_len: int
    # The two pooled groups of the suffix (`expert_1_segment_means`): suffix token 0, then the rest.
    suffix_segment_names: tuple[str, str]
    experts: tuple[ExpertSizes, ...]
    depth: int
    action_horizon: int
    action_dim: int
    step_axes: tuple[StepAxis, ...] = (StepAxis("prefix", (0,), "once"), StepAxis("denoise", (1,), "num_steps"))

    # ------------------------------------------------------------------------------------------------ positions
    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def text_start(self) -> int:
        """First text position in the prefix: the image tokens of every camera come first."""
        return self.num_cameras * self.tokens_per_camera

    @property
    def prefix_len(self) -> int:
        return self.text_start + self.max_token_len

    @property
    def joint_len(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def segment_names(self) -> tuple[str, ...]:
        """Token groups of the prefix, in order (the `expert_0_segment_means` axis)."""
        return (*self.cameras, "text")

    def runs_once(self, expert: int) -> bool:
        """True when `expert` runs in a pass that happens once per inference (its edits reach later passes only
        through the cache)."""
        return any(expert in a.experts and a.steps == "once" for a in self.step_axes)

    def expert_len(self, expert: int) -> int:
        return self.prefix_len if expert == 0 else self.suffix_len

    def segments(self) -> dict[str, tuple[int, int, int]]:
        """Named token segments: name -> (expert, start, stop) over that expert's tokens (prefix / suffix)."""
        tpc = self.tokens_per_camera
        out = {name: (0, c * tpc, (c + 1) * tpc) for c, name in enumerate(self.cameras)}
        out["text"] = (0, self.text_start, self.prefix_len)
        out.update({name: (1, a, b) for name, a, b in self.suffix_segments})
        return out

    def prefix_group_bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, stop) of each prefix group (`segment_names`) over the prefix."""
        return tuple(self.segments()[name][1:] for name in self.segment_names)

    def expert_span(self, expert: int, tokens: Span) -> tuple[int, int]:
        """(start, stop) of `tokens` over the expert's own tokens (assumes a validated span)."""
        if tokens == "all":
            return (0, self.expert_len(expert))
        if isinstance(tokens, str):
            return self.segments()[tokens][1:]
        return tokens

    def joint_span(self, tokens: Span) -> tuple[int, int]:
        """(start, stop) of `tokens` in the joint sequence [prefix | suffix] (assumes a validated span)."""
        tp = self.prefix_len
        named = {"all": (0, self.joint_len), "prefix": (0, tp), "suffix": (tp, self.joint_len)}
        if tokens in named:
            return named[tokens]
        if isinstance(tokens, str):
            expert, start, stop = self.segments()[tokens]
            return (start, stop) if expert == 0 else (tp + start, tp + stop)
        return tokens

    def layer_tuple(self, layers: tuple[int, ...] | None) -> tuple[int, ...]:
        return tuple(range(self.depth)) if layers is None else tuple(i % self.depth for i in layers)

    def manifest_fields(self) -> dict:
        """What a collection's manifest records of the layout (the analysis reads these back)."""
        return {
            "text_start": self.text_start,
            "segment_names": list(self.segment_names),
            "suffix_segment_names": list(self.suffix_segment_names),
        }


def layout_of(model_or_config) -> TokenLayout:
    """The layout of a model, a model config or a layout."""
    return model_or_config if isinstance(model_or_config, TokenLayout) else model_or_config.layout
