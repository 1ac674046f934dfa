"""The policy calls a recorded inference is made of, shared by every producer: the inference itself, its
counterfactual rerun (the same observation, noise and intervention under another prompt) and the rerun's
teacher-forced twin (fed the baseline's x_t at every denoising step, so the two runs differ by the prompt alone);
and the check that a teacher-forced rerun can run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.envs import base as env_base
from openpi.models.capture import CaptureSpec
from openpi.policies.policy import Policy


@dataclasses.dataclass(frozen=True)
class Inference:
    """One policy call of the rollout, and its counterfactual rerun when this inference has one."""

    element: dict[str, Any]  # the policy input
    result: dict[str, Any]  # what `Policy.infer_with_latents` returned
    counterfactual: dict[str, Any] | None = None
    counterfactual_prompt: str | None = None
    teacher_forced: dict[str, Any] | None = None  # the counterfactual rerun fed the baseline's x_t


def infer_one(policy: Policy, element: dict[str, Any], noise: Any, capture: CaptureSpec, intervention: Any):
    """`Policy.infer_with_latents`, passing the intervention only when there is one."""
    extra = {} if intervention is None else {"intervention": intervention}
    return policy.infer_with_latents(element, noise=noise, capture=capture, **extra)


def rerun_with_prompt(
    policy: Policy, inference: Inference, prompt: str, capture: CaptureSpec, intervention: Any = None
) -> Inference:
    """`inference` with its counterfactual: the same observation, noise (and intervention) under another `prompt`."""
    element = {**inference.element, env_base.PROMPT_KEY: prompt}
    cf = infer_one(policy, element, inference.result["noise"], capture, intervention)
    return dataclasses.replace(inference, counterfactual=cf, counterfactual_prompt=prompt)


def teacher_forced_rerun(
    policy: Policy, inference: Inference, prompt: str, capture: CaptureSpec, intervention: Any = None
) -> dict[str, Any]:
    """The counterfactual rerun fed the baseline's x_t at every denoising step (needs ``capture.trajectory``): the
    two runs then differ by the prompt alone, so expert-1 prompt sensitivity is not contaminated by trajectory
    divergence (its layer 0 is exactly 0). Same observation, noise and intervention as the baseline. Stored under
    ``cf_tf_<key>`` (`schema.teacher_forced`)."""
    x_t = inference.result["latents"].get("x_t")
    if x_t is None:
        raise ValueError("a teacher-forced rerun needs the baseline's trajectory: capture with trajectory=True")
    element = {**inference.element, env_base.PROMPT_KEY: prompt}
    extra = {} if intervention is None else {"intervention": intervention}
    return policy.infer_with_latents(
        element, noise=inference.result["noise"], capture=capture, x_t_sequence=x_t[:-1], **extra
    )


# The flags `check_teacher_forced` names in its message (the synthetic collection passes its field names).
TEACHER_FORCED_FLAGS = {
    "flag": "--counterfactual-teacher-forced",
    "counterfactual": "add --counterfactual blank (or other-task)",
    "trajectory": "drop --capture.no-trajectory (the default captures it)",
    "expert_1": "add --capture.expert-1 pooled (or full)",
}


def check_teacher_forced(
    enabled: bool, counterfactual: str, capture: CaptureSpec, flags: Mapping[str, str] = TEACHER_FORCED_FLAGS
) -> None:
    """Raises ValueError naming each fix when a teacher-forced rerun is asked for but cannot run: it reruns the
    counterfactual inference (a counterfactual mode), feeds it the baseline's trajectory (``capture.trajectory``) and
    exists to measure expert 1 (``capture.expert_1`` not "off")."""
    if not enabled:
        return
    fixes = []
    if counterfactual == "none":
        fixes.append(f"a counterfactual prompt to rerun with ({flags['counterfactual']})")
    if not capture.trajectory:
        fixes.append(f"the baseline's trajectory x_t to feed ({flags['trajectory']})")
    if capture.expert_1 == "off":
        fixes.append(f"an expert-1 stream to compare ({flags['expert_1']})")
    if fixes:
        raise ValueError(
            f"{flags['flag']} reruns each counterfactual inference fed the baseline's x_t at every denoising step; it "
            "needs " + "; ".join(fixes) + "."
        )


def other_task_draw(seed: int, task_id: int, k: int, n_tasks: int) -> int:
    """The task whose instruction episode `k` of `task_id` reruns with under ``--counterfactual other-task``: drawn
    uniformly from the suite's OTHER tasks, from ``default_rng([seed, task_id, k, 1])`` (its own stream: the noise
    draws from ``[seed, task_id, k]``). Random per episode so that, across a task's episodes, the rerun's prompt is
    not a function of the scene: a scene-specific "not my instruction" response then cannot name the rerun's prompt
    (with the next task's prompt it decoded at 0.975; drawn at random it reads at the scene-aware chance)."""
    if n_tasks < 2:
        raise ValueError(f"an other-task counterfactual needs two tasks or more, got {n_tasks}")
    other = int(np.random.default_rng([seed, task_id, k, 1]).integers(n_tasks - 1))
    return other if other < task_id else other + 1
