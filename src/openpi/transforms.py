"""Data transforms used by pi0 inference (openpi-compatible).

Each transform is a small frozen dataclass whose ``__call__(data: dict) -> dict`` returns a new dict (inputs are not
modified). Keys that address nested values are '/'-joined paths (``"state"``, ``"actions"``,
``"image/base_0_rgb"``); a literal flat key containing '/' (such as LIBERO's ``"observation/state"``) is found too.

Typical pi0 LIBERO inference order (see `openpi.policies.policy_config`):
inputs ``InjectDefaultPrompt -> LiberoInputs -> DeltaActions -> Normalize -> ResizeImages -> TokenizePrompt ->
PadStatesAndActions``; outputs ``Unnormalize -> AbsoluteActions -> LiberoOutputs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

from openpi.models import tokenizer as _tokenizer
from openpi.shared import image_tools
from openpi.shared import normalize as _normalize

DataDict = dict[str, Any]
DataTransformFn = Callable[[DataDict], DataDict]

# Added to std (and to q99 - q01) before dividing, as openpi does.
EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """``make_bool_mask(6, -1) == (True,) * 6 + (False,)``: positive n gives n Trues, negative n gives |n| Falses."""
    out: list[bool] = []
    for d in dims:
        out.extend([d > 0] * abs(int(d)))
    return tuple(out)


def pad_to_dim(x: np.ndarray, target_dim: int, *, axis: int = -1, value: float = 0.0) -> np.ndarray:
    """Pad `x` along `axis` with `value` up to `target_dim`; unchanged if already that long."""
    x = np.asarray(x)
    current = x.shape[axis]
    if current > target_dim:
        raise ValueError(
            f"Cannot pad an array with {current} entries on axis {axis} down to {target_dim}: the data is wider than "
            "the model's action_dim. Use a model config with a larger action_dim."
        )
    if current == target_dim:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target_dim - current)
    return np.pad(x, widths, constant_values=value)


def _lookup(data: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """Find `key` as a literal key or as a '/'-path into nested dicts."""
    if key in data:
        return True, data[key]
    node: Any = data
    for part in key.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _replace(data: Mapping[str, Any], key: str, value: Any) -> DataDict:
    """A copy of `data` with `key` (literal or '/'-path, which must exist) set to `value`."""
    if key in data:
        return {**data, key: value}
    head, _, rest = key.partition("/")
    return {**data, head: _replace(data[head], rest, value)}


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        path = f"{prefix}{k}"
        keys.extend(_flat_keys(v, f"{path}/") if isinstance(v, Mapping) else [path])
    return keys


def require_key(data: Mapping[str, Any], key: str, who: str) -> Any:
    """The value at `key` (literal or '/'-path); if absent, a KeyError naming `who` and the keys present."""
    found, value = _lookup(data, key)
    if not found:
        raise KeyError(f"{who} needs the key {key!r}, which the data does not have. Keys present: {_flat_keys(data)}.")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Composition


@dataclasses.dataclass(frozen=True)
class CompositeTransform:
    """Applies its transforms in order."""

    transforms: tuple[DataTransformFn, ...]

    def __call__(self, data: DataDict) -> DataDict:
        for transform in self.transforms:
            data = transform(data)
        return data


def compose(transforms: Sequence[DataTransformFn]) -> CompositeTransform:
    """One transform that applies `transforms` in order (nested composites are flattened)."""
    flat: list[DataTransformFn] = []
    for t in transforms:
        flat.extend(t.transforms if isinstance(t, CompositeTransform) else [t])
    return CompositeTransform(tuple(flat))


# ---------------------------------------------------------------------------------------------------------------------
# Prompt


@dataclasses.dataclass(frozen=True)
class InjectDefaultPrompt:
    """Sets ``data["prompt"]`` to `prompt` when the data has none (and `prompt` is not None)."""

    prompt: str | None

    def __call__(self, data: DataDict) -> DataDict:
        if self.prompt is not None and "prompt" not in data:
            return {**data, "prompt": np.asarray(self.prompt)}
        return data


def _prompt_to_str(prompt: Any) -> str:
    if isinstance(prompt, np.ndarray):
        if prompt.size != 1:
            raise ValueError(f"Expected one prompt per sample, got an array of shape {prompt.shape}.")
        prompt = prompt.reshape(()).item()
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
        raise TypeError(f"The prompt must be a string, got {type(prompt).__name__}.")
    return prompt


@dataclasses.dataclass(frozen=True)
class TokenizePrompt:
    """Replaces ``prompt`` with ``tokenized_prompt`` (int32) and ``tokenized_prompt_mask`` (bool).

    With `discrete_state_input` (pi0.5) the prompt also carries ``state`` as 256-bin digits; this runs after
    Normalize and before padding, so the state is the normalised, unpadded one.
    """

    tokenizer: _tokenizer.PaligemmaTokenizer
    discrete_state_input: bool = False

    def __call__(self, data: DataDict) -> DataDict:
        if data.get("prompt") is None:
            raise ValueError(
                "TokenizePrompt needs a 'prompt' in the data: pass one in the observation, or create the policy with "
                "default_prompt=..."
            )
        data = dict(data)
        state = None
        if self.discrete_state_input:
            state = np.asarray(require_key(data, "state", "TokenizePrompt(discrete_state_input=True)"))
        tokens, mask = self.tokenizer.tokenize(_prompt_to_str(data.pop("prompt")), state)
        return {**data, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}


# ---------------------------------------------------------------------------------------------------------------------
# Normalization


def _check_quantiles(key: str, stats: _normalize.NormStats) -> None:
    if not stats.has_quantiles:
        raise ValueError(
            f"Quantile normalization needs q01/q99 for {key!r}, but the norm stats have none. Use z-score "
            "normalization (use_quantiles=False) or recompute the norm stats with quantiles."
        )


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Normalizes the keys named in `norm_stats` (z-score, or quantile to [-1, 1]).

    Runs before padding: the stats are sliced to the data's last dim, so they must be at least that long.
    With `strict`, every stats key must be present in the data; otherwise absent keys (e.g. ``actions`` at
    inference) are skipped.
    """

    norm_stats: Mapping[str, _normalize.NormStats] | None
    use_quantiles: bool = False
    strict: bool = False

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        for key, stats in self.norm_stats.items():
            found, value = _lookup(data, key)
            if not found:
                if self.strict:
                    require_key(data, key, "Normalize(strict=True)")
                continue
            data = _replace(data, key, self._normalize(key, np.asarray(value), stats))
        return data

    def _normalize(self, key: str, x: Float[np.ndarray, "*b d"], stats: _normalize.NormStats) -> np.ndarray:
        d = x.shape[-1]
        if stats.mean.shape[-1] < d:
            raise ValueError(
                f"Norm stats for {key!r} have {stats.mean.shape[-1]} dims but the data has {d}. Normalize runs before "
                "padding; use norm stats computed for this data."
            )
        if self.use_quantiles:
            _check_quantiles(key, stats)
            q01, q99 = stats.q01[:d], stats.q99[:d]
            return (x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0
        return (x - stats.mean[:d]) / (stats.std[:d] + EPS)


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverts `Normalize` on (possibly padded) model outputs. Every stats key must be present.

    z-score pads the stats to the data's dim with mean 0 and std 1; quantile passes the dims beyond the stats through.
    """

    norm_stats: Mapping[str, _normalize.NormStats] | None
    use_quantiles: bool = False

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        for key, stats in self.norm_stats.items():
            value = require_key(data, key, "Unnormalize")
            data = _replace(data, key, self._unnormalize(key, np.asarray(value), stats))
        return data

    def _unnormalize(self, key: str, x: Float[np.ndarray, "*b d"], stats: _normalize.NormStats) -> np.ndarray:
        d = x.shape[-1]
        if self.use_quantiles:
            _check_quantiles(key, stats)
            q01, q99 = stats.q01[:d], stats.q99[:d]
            n = q01.shape[-1]
            head = (x[..., :n] + 1.0) / 2.0 * (q99 - q01 + EPS) + q01
            return np.concatenate([head, x[..., n:]], axis=-1) if n < d else head
        mean = pad_to_dim(stats.mean[:d], d, value=0.0)
        std = pad_to_dim(stats.std[:d], d, value=1.0)
        return x * (std + EPS) + mean


# ---------------------------------------------------------------------------------------------------------------------
# Delta / absolute actions


def _masked_state(state: np.ndarray, mask: tuple[bool, ...], who: str) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    dims = m.shape[-1]
    if state.shape[-1] < dims:
        raise ValueError(f"{who}: the mask covers {dims} dims but the state has only {state.shape[-1]}.")
    # [..., dims] -> [..., 1, dims] so it broadcasts over the action horizon.
    return np.expand_dims(np.where(m, state[..., :dims], 0), axis=-2)


@dataclasses.dataclass(frozen=True)
class DeltaActions:
    """Training-side: ``actions[..., :n] -= state[..., :n]`` on the dims where `mask` is True.

    Does nothing without ``actions`` in the data (inference) or with ``mask=None``.
    """

    mask: tuple[bool, ...] | None

    def __call__(self, data: DataDict) -> DataDict:
        if "actions" not in data or self.mask is None:
            return data
        state = np.asarray(require_key(data, "state", "DeltaActions"))
        actions = np.array(data["actions"], copy=True)
        dims = len(self.mask)
        actions[..., :dims] -= _masked_state(state, self.mask, "DeltaActions")
        return {**data, "actions": actions}


@dataclasses.dataclass(frozen=True)
class AbsoluteActions:
    """Inverse of `DeltaActions`: ``actions[..., :n] += state[..., :n]`` on the dims where `mask` is True."""

    mask: tuple[bool, ...] | None

    def __call__(self, data: DataDict) -> DataDict:
        if "actions" not in data or self.mask is None:
            return data
        state = np.asarray(require_key(data, "state", "AbsoluteActions"))
        actions = np.array(data["actions"], copy=True)
        dims = len(self.mask)
        actions[..., :dims] += _masked_state(state, self.mask, "AbsoluteActions")
        return {**data, "actions": actions}


# ---------------------------------------------------------------------------------------------------------------------
# Images and padding


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resizes every image in ``data["image"]`` to (height, width) with aspect-preserving padding (PIL bilinear)."""

    height: int
    width: int

    def __call__(self, data: DataDict) -> DataDict:
        images = require_key(data, "image", "ResizeImages")
        resized = {k: image_tools.resize_with_pad(v, self.height, self.width) for k, v in images.items()}
        return {**data, "image": resized}


@dataclasses.dataclass(frozen=True)
class PadStatesAndActions:
    """Zero-pads ``state`` (and ``actions`` when present) to the model's action_dim."""

    model_action_dim: int

    def __call__(self, data: DataDict) -> DataDict:
        out = {**data, "state": pad_to_dim(require_key(data, "state", "PadStatesAndActions"), self.model_action_dim)}
        if "actions" in data:
            out["actions"] = pad_to_dim(data["actions"], self.model_action_dim)
        return out
