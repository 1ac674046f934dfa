"""The seed plan's view of a collection: its key names and layer-first expert-1 states, over the lazy store views.

    task_data = expert_data_utils.load_seed_task_data("data/seed_run", task_id=0)   # or seed_view(any task data)
    step = task_data["episodes"]["episode_0"]["rollout_steps"]["step_15"]
    step["expert_0_hidden_states"][layer_idx]   # [B, Tp, W0]: expert 0 entering layer layer_idx (prefix pass)
    step["expert_1_hidden_states"][layer_idx]   # [B, Ts, W1]: expert 1 entering layer layer_idx at `denoise_step`
    step["expert_1_hidden_states_all_steps"]    # [S, L, B, Ts, W1]: every captured denoising step (the store's)
    step["timestep"], step["action"], step["observation"]   # t, the action chunk, the model's inputs

Keys: ``timestep`` = the store's ``t``; ``action`` = ``actions`` (the [H, action_dim] chunk the robot got);
``observation`` = ``{"observation/image", "observation/wrist_image", "observation/state", "prompt"}`` (openpi's
LIBERO element as the model saw it). ``expert_1_hidden_states`` is layer-first at ONE denoising step: `denoise_step`
indexes the captured steps, default -1 = the last one (with all steps captured: the final Euler step, t = 1/S, whose
velocity produces the executed actions). Every other stored key is passed through unchanged.

Never a silent substitution: a collection without the full streams (the default capture keeps pooled means) raises
`MissingStreamError` naming the flag that records them (``--capture seed``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

SEED_FLAG = "--capture seed"
_FULL_FLAGS = {
    "expert_0_hidden_states": "--capture.expert-0 full",
    "expert_1_hidden_states": "--capture.expert-1 full",
}
_OBSERVATION_KEYS = {"image": "observation/image", "wrist_image": "observation/wrist_image",
                     "state": "observation/state", "prompt": "prompt"}  # fmt: skip


class MissingStreamError(KeyError):
    """A seed key whose stream this collection did not record; the message names the capture flag."""

    def __str__(self) -> str:
        return str(self.args[0])


class _View(Mapping):
    def __repr__(self) -> str:
        return f"<{type(self).__name__} ({len(self)} keys)>"


class SeedStep(_View):
    def __init__(self, step: Mapping[str, Any], denoise_step: int):
        self._step, self._denoise_step = step, denoise_step

    def _stored(self, key: str, seed_key: str) -> Any:
        if key not in self._step:
            pooled = key.replace("hidden_states", "segment_means")
            found = f"it holds {pooled} (pooled means) instead" if pooled in self._step else "it was not captured"
            raise MissingStreamError(
                f"{seed_key!r}: this collection has no full {key} ({found}). Record it with {SEED_FLAG} (or "
                f"{_FULL_FLAGS[key]}) when collecting or serving."
            )
        return self._step[key]

    def __getitem__(self, key: str) -> Any:
        if key == "timestep":
            return self._step["t"]
        if key == "action":
            return self._step["actions"]
        if key == "observation":
            return {name: self._step[k] for k, name in _OBSERVATION_KEYS.items() if k in self._step}
        if key == "expert_0_hidden_states":
            return self._stored(key, key)
        if key == "expert_1_hidden_states":
            return self._stored(key, key)[self._denoise_step]
        if key == "expert_1_hidden_states_all_steps":
            return self._stored("expert_1_hidden_states", key)
        return self._step[key]

    def __iter__(self) -> Iterator[str]:
        yield from ("timestep", "action", "observation")
        if "expert_0_hidden_states" in self._step:
            yield "expert_0_hidden_states"
        if "expert_1_hidden_states" in self._step:
            yield from ("expert_1_hidden_states", "expert_1_hidden_states_all_steps")
        yield from (k for k in self._step if k not in ("expert_0_hidden_states", "expert_1_hidden_states"))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Wrapped(_View):
    """A mapping whose values are wrapped by `wrap` (the episodes / rollout-step levels)."""

    def __init__(self, inner: Mapping[str, Any], wrap):
        self._inner, self._wrap = inner, wrap

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, self._inner[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


def seed_view(task_data: Mapping[str, Any], denoise_step: int = -1) -> Mapping[str, Any]:
    """`task_data` (one task, from `load_inference_task_data`) under the seed's key names (module docstring)."""

    def step(_, s):
        return SeedStep(s, denoise_step)

    def episode(_, e):
        return _Wrapped(e, lambda k, v: _Wrapped(v, step) if k == "rollout_steps" else v)

    return _Wrapped(task_data, lambda k, v: _Wrapped(v, episode) if k == "episodes" else v)
