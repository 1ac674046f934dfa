"""The records every producer of a latent store writes (the collection, the server, the replay, the synthetic
collection): the keys of one inference, its counterfactual rerun's ``cf_*`` keys and the teacher-forced twin's
``cf_tf_*`` keys (`openpi.latents.schema`), and the noise of an episode's inferences.

The noise of inference i of episode (task, k) is draw i of ``default_rng([seed, task, k])``: the same in a resumed
run, a parallel run, the server (a harness that replays the collection's episode ids with its seed gets its noise)
and a replay; a condition's inference i is paired with the baseline's inference i.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from openpi.envs import base as env_base
from openpi.latents import schema
from openpi.latents.recording.reruns import Inference


def episode_noise(seed: int, task_id: int, k: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """The noise of each inference of episode `k`: successive draws from ``default_rng([seed, task_id, k])``."""
    rng = np.random.default_rng([seed, task_id, k])
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)


def teacher_forced_fields(cf_tf: dict[str, Any]) -> dict[str, Any]:
    """The store fields of a :func:`teacher_forced_rerun`."""
    return {
        schema.teacher_forced("actions"): np.asarray(cf_tf["actions"], np.float32),
        schema.teacher_forced("model_actions"): np.asarray(cf_tf["model_actions"], np.float32),
        **{schema.teacher_forced(key): v for key, v in cf_tf["latents"].items()},
    }


def counterfactual_fields(inference: Inference) -> dict[str, Any]:
    """The store fields of `inference`'s counterfactual rerun (``cf_*``) and its teacher-forced twin (``cf_tf_*``),
    or {} without a rerun."""
    cf = inference.counterfactual
    if cf is None:
        return {}
    out = {
        schema.counterfactual("prompt"): inference.counterfactual_prompt,
        schema.counterfactual("actions"): np.asarray(cf["actions"], np.float32),
        schema.counterfactual("model_actions"): np.asarray(cf["model_actions"], np.float32),
        **{schema.counterfactual(key): v for key, v in cf["latents"].items()},
    }
    if inference.teacher_forced is not None:
        out.update(teacher_forced_fields(inference.teacher_forced))
    return out


def base_record(
    t: int, element: dict[str, Any], result: dict[str, Any], *, replan_steps: int, state_key: str
) -> dict[str, Any]:
    """The record keys every recorded inference has (`openpi.latents.schema`), from its policy input and result."""
    actions = np.asarray(result["actions"], np.float32)
    return {
        "t": t,
        "prompt": element[env_base.PROMPT_KEY],
        "actions": actions,  # the full chunk [H, action_dim] after the output transforms
        "executed_actions": actions[:replan_steps],  # queued for execution (the episode may end earlier)
        "model_actions": np.asarray(result["model_actions"], np.float32),  # normalized model output [H, AD]
        "noise": np.asarray(result["noise"], np.float32),
        "state": np.asarray(element[state_key], np.float32),
        **result["latents"],
    }
