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
from collections.abc import Callable
from typing import Any

import numpy as np

from openpi.envs import base as env_base
from openpi.latents.collect.args import Plan, counterfactual_prompt
from openpi.latents.collect.outputs import EpisodeSink
from openpi.latents.recording.records import base_record, counterfactual_fields, episode_noise
from openpi.latents.recording.reruns import Inference, infer_one, rerun_with_prompt, teacher_forced_rerun
from openpi.models.intervention import Intervention
from openpi.policies.policy import Policy


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
