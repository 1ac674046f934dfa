"""One recorded episode: the rollout loop of `openpi.envs.base` with a record written at every inference.

An episode is the same whether it runs in one go, after a resume, or in a run with counterfactual reruns: its noise is
drawn from `seed`, `task_id` and the episode index, and a counterfactual rerun reuses the inference's observation and
noise without touching the env. The run's condition (`conditions`) sets the prompt and the intervention of each
inference; the noise does not depend on it, so a condition's inference i is paired with the baseline's inference i.
With ``--counterfactual-teacher-forced`` each counterfactual rerun has a twin fed the baseline's x_t at every denoising
step (`teacher_forced_rerun`, ``cf_tf_*`` keys): it differs from the baseline by the prompt alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from openpi.envs import base as env_base
from openpi.latents import schema
from openpi.latents.collect.args import Plan, counterfactual_prompt
from openpi.latents.collect.outputs import EpisodeSink
from openpi.models.capture import CaptureSpec
from openpi.models.intervention import Intervention
from openpi.policies.policy import Policy


def episode_noise(seed: int, task_id: int, k: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """The noise of each inference of episode `k`: successive draws from ``default_rng([seed, task_id, k])``."""
    rng = np.random.default_rng([seed, task_id, k])
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)


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


def step_record(t: int, inference: Inference, plan: Plan) -> dict[str, Any]:
    """The store record of `inference`, made at env step `t` (keys: `openpi.latents.schema`)."""
    element, args, sim = inference.element, plan.args, plan.simulator
    record = base_record(t, element, inference.result, replan_steps=args.replan_steps, state_key=sim.state_key)
    if args.store_images:
        record.update({key: element[input_key] for key, input_key in sim.camera_keys.items()})
    record.update(counterfactual_fields(inference))
    return record


class EpisodeRecorder:
    """The policy side of one recorded episode, as `env_base.run_episode` calls it.

    `policy_fn` infers with latents (adding the counterfactual rerun, and its teacher-forced twin with
    ``--counterfactual-teacher-forced``, at every `counterfactual_every`-th inference)
    and keeps the inference; `on_inference`, which the loop calls right after with the env step t, writes its record.
    """

    def __init__(
        self,
        plan: Plan,
        policy: Policy,
        writer: EpisodeSink,
        task: env_base.TaskInfo,
        k: int,
        check_stop: Callable[[], None] | None = None,
    ):
        config = policy.model.config
        self._plan, self._policy, self._writer = plan, policy, writer
        self._check_stop = check_stop  # raises to abandon the episode before its next inference
        self._noise = episode_noise(plan.args.seed, task.task_id, k, (config.action_horizon, config.action_dim))
        self._cf_prompt = counterfactual_prompt(plan, task, k)
        self._inference: Inference | None = None  # made by policy_fn, recorded by on_inference
        self.num_inferences = 0

    def next_noise(self) -> np.ndarray:
        """The noise of this episode's next inference (drawn per task, episode and inference index)."""
        return next(self._noise)

    def intervention(self) -> Intervention | None:
        """The condition's edit for this episode's next inference (None: none)."""
        return self._plan.condition.intervention_at(self.num_inferences)

    def accept(self, element: dict[str, Any], result: dict[str, Any]) -> np.ndarray:
        """Keeps the inference `result` of `element` (made with `next_noise()` and `intervention()`), adds the
        counterfactual rerun when this inference has one, and returns the action chunk. The parallel collection
        batches the call itself."""
        inference = Inference(element, result)
        args = self._plan.args
        if self._cf_prompt is not None and self.num_inferences % args.counterfactual_every == 0:
            edit = self.intervention()
            inference = rerun_with_prompt(self._policy, inference, self._cf_prompt, args.capture, edit)
            if args.counterfactual_teacher_forced:
                tf = teacher_forced_rerun(self._policy, inference, self._cf_prompt, args.capture, edit)
                inference = dataclasses.replace(inference, teacher_forced=tf)
        self.num_inferences += 1
        self._inference = inference
        return result["actions"]

    def policy_fn(self, element: dict[str, Any]) -> np.ndarray:
        if self._check_stop is not None:
            self._check_stop()
        result = infer_one(self._policy, element, self.next_noise(), self._plan.args.capture, self.intervention())
        return self.accept(element, result)

    def record(self, t: int) -> None:
        """Writes the record of the inference kept last, made at env step `t`."""
        inference, self._inference = self._inference, None
        if inference is None:
            raise RuntimeError("record was called without an inference to record.")
        self._writer.append_step(step_record(t, inference, self._plan))

    def on_inference(self, t: int, element: dict[str, Any], chunk: np.ndarray) -> None:
        if self._inference is None or self._inference.element is not element:
            raise RuntimeError("on_inference was called without a matching policy_fn call.")
        self.record(t)


def episode_attrs(plan: Plan, task: env_base.TaskInfo, k: int) -> dict[str, Any]:
    """The stored attrs of episode `k` of `task` (the same whichever process or machine runs it)."""
    return {
        "init_state_index": k,
        "seed": plan.args.seed,
        "prompt": plan.condition.prompt_of(task),
        "max_steps": plan.max_steps,
        "counterfactual_prompt": counterfactual_prompt(plan, task, k),
        "task_language": task.language,
        # the instruction the checkpoint was trained with (a LIBERO-PRO suite's unperturbed text; = the prompt
        # elsewhere) and the digest of the initial simulator state (pairing across runs checks it)
        "trained_instruction": getattr(task, "package_language", None) or task.language,
        "init_state_hash": plan.simulator.init_state_digest(task, k),
        "condition": plan.condition.describe(task),
    }


def finish_metadata(result: env_base.EpisodeResult) -> dict[str, Any]:
    """The stored outcome of an episode."""
    return {
        "success": bool(result.success),
        "total_steps": int(result.total_steps),
        "error": result.error,
        "wall_time_s": round(result.wall_time_s, 3),
        "num_inferences": int(result.num_inferences),
    }


def run_task_episode(
    plan: Plan,
    policy: Policy,
    env: env_base.Env,
    writer: EpisodeSink,
    k: int,
    *,
    check_stop: Callable[[], None] | None = None,
) -> env_base.EpisodeResult:
    """Episode `k` of `env`'s task: openpi's rollout protocol, one record per inference, counterfactual reruns.

    `check_stop` is called before each inference; what it raises abandons the episode (left incomplete in the output).
    """
    recorder = EpisodeRecorder(plan, policy, writer, env.task, k, check_stop)
    return env_base.run_episode(
        env,
        k,
        recorder.policy_fn,
        prompt=plan.condition.prompt_of(env.task),
        max_steps=plan.max_steps,
        replan_steps=plan.replan_steps,
        on_inference=recorder.on_inference,
        record_frames=plan.args.save_videos,
        num_steps_wait=plan.args.num_steps_wait,
    )
