"""Observation pairs for causal maps: a clean run and a corrupted run that differ by the prompt alone.

Live pairs (`make_pair`) come from a raw observation and a policy (its input transforms build the model inputs);
stored pairs (`stored_observations`) replay a collection's stored images, state, prompt and noise, as
`scripts/replay_collection.py` does. The corrupted prompt is refitted to the clean prompt's token layout
(`patch_map.fit_prompt`), so both runs share every position and mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from openpi.envs import base as env_base
from openpi.models import patch_map
from openpi.models.model import Observation

CORRUPTIONS = ("other-task", "blank")


def corrupted_prompt(prompt: str, corrupt: str, prompts: Sequence[str] = ()) -> str:
    """"blank": the empty prompt; "other-task": the next prompt of `prompts` (cyclic) that differs from `prompt`;
    anything else: that text itself (e.g. a LIBERO-PRO rewording)."""
    if corrupt == "blank":
        return ""
    if corrupt != "other-task":
        return corrupt
    others = [p for p in dict.fromkeys(prompts) if p != prompt]
    if not others:
        raise ValueError(
            f"--corrupt other-task needs another task's prompt, but the collection's prompts are only {list(prompts)}: "
            "use --corrupt blank, or give a rewording as --corrupt."
        )
    ordered = list(dict.fromkeys(prompts))
    start = ordered.index(prompt) + 1 if prompt in ordered else 0
    return next(p for p in ordered[start:] + ordered[:start] if p != prompt)


@dataclasses.dataclass(frozen=True)
class Pair:
    clean: Observation  # model inputs, batch one
    corrupt: Observation  # the same with the corrupted prompt's tokens (fitted to the clean layout)
    noise: np.ndarray  # [1, H, A]
    clean_prompt: str
    corrupt_prompt: str


def make_pair(policy, raw: dict, corrupt_prompt: str, noise: np.ndarray) -> Pair:
    """The pair of `raw` (a policy input with its clean "prompt") and `corrupt_prompt`, on the same `noise` [H, A]."""
    clean_prompt = str(raw[env_base.PROMPT_KEY])
    _, clean = policy.prepare(dict(raw))
    _, corrupt = policy.prepare({**raw, env_base.PROMPT_KEY: corrupt_prompt})
    if clean.tokenized_prompt is None:
        raise ValueError("The policy's model takes no prompt tokens: there is nothing to patch.")
    n_valid = int(np.asarray(clean.tokenized_prompt_mask).sum())
    ids, mask = patch_map.fit_prompt(corrupt.tokenized_prompt[0], corrupt.tokenized_prompt_mask[0], n_valid)
    corrupt = dataclasses.replace(corrupt, tokenized_prompt=ids[None], tokenized_prompt_mask=mask[None])
    noise = np.asarray(noise, np.float32).reshape(1, *np.shape(noise)[-2:])
    return Pair(clean, corrupt, noise, clean_prompt, corrupt_prompt)


@dataclasses.dataclass(frozen=True)
class StoredObservation:
    task_id: int
    episode: int
    step: int
    raw: dict  # the policy input (cameras, state, prompt)
    noise: np.ndarray  # [H, A]


def stored_observations(plan, limit: int | None = None, every: int = 1) -> Iterator[StoredObservation]:
    """The rollout steps of a replay plan's episodes (`openpi.latents.replay.make_plan`), every `every`-th step, at
    most `limit` in all."""
    sim, count = plan.simulator, 0
    for task_id, k in plan.episodes:
        ep = plan.source.episode(task_id, k)
        for s in range(0, ep.committed, every):
            if limit is not None and count >= limit:
                return
            raw = {input_key: ep.read(key, steps=s) for key, input_key in sim.camera_keys.items()}
            raw |= {sim.state_key: ep.read("state", steps=s), env_base.PROMPT_KEY: str(ep.read_step_value("prompt", s))}
            yield StoredObservation(task_id, k, s, raw, np.asarray(ep.read("noise", steps=s)))
            count += 1
