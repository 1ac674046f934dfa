"""A latent collection without a simulator: a policy run on generated observations, written to the latent store.

Each "task" is one prompt; each episode is ``n_steps`` independent inferences on fresh observations drawn by an
``observe(rng, prompt)`` callable (e.g. :func:`openpi.training.control_organisms.raw_observations`). Records, the
manifest and the episode attrs follow the LIBERO collection (:mod:`openpi.latents.collect`): the same record keys
(``recording.records.base_record``), the same counterfactual reruns (same observation and noise, another prompt, under
``cf_*`` keys; with ``teacher_forced`` also their twin fed the baseline's x_t, under ``cf_tf_*``) and the same episode
attrs, so the analysis reads it unchanged. There is no environment: ``t`` is the
inference index, ``executed_actions`` is the whole chunk and ``success`` is what ``judge`` says (False without one).

Used by the known-answer test of the control organisms (tests/test_control_organisms.py).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import tqdm

from openpi.envs.base import state_digest
from openpi.latents import store as _store
from openpi.latents.recording.records import base_record, counterfactual_fields
from openpi.latents.recording.reruns import (
    Inference,
    check_teacher_forced,
    other_task_draw,
    rerun_with_prompt,
    teacher_forced_rerun,
)
from openpi.latents.store.manifest import RunManifest
from openpi.models.capture import CaptureSpec
from openpi.policies.policy import Policy

Observe = Callable[[np.random.Generator, str], dict[str, Any]]
_TEACHER_FORCED_FIELDS = {
    "flag": "SyntheticCollection(teacher_forced=True)",
    "counterfactual": "counterfactual='blank' or 'other-task'",
    "trajectory": "CaptureSpec(trajectory=True)",
    "expert_1": "CaptureSpec(expert_1='pooled' or 'full')",
}
# judge(prompt, raw observations, results) -> success of the episode
Judge = Callable[[str, list[dict[str, Any]], list[dict[str, Any]]], bool]


@dataclasses.dataclass(frozen=True)
class SyntheticCollection:
    """What to collect: one task per prompt, `n_episodes` × `n_steps` inferences each."""

    prompts: tuple[str, ...]
    n_episodes: int = 2
    n_steps: int = 4
    capture: CaptureSpec = CaptureSpec()
    # "other-task": another prompt of `prompts`, drawn at random per episode (`collect.args.other_task_draw`, as the
    # LIBERO collection); "blank": the empty prompt; "none": no reruns.
    counterfactual: str = "other-task"
    num_steps: int | None = None  # denoising steps (None: the policy's default)
    seed: int = 0
    # Also rerun each counterfactual fed the baseline's x_t at every denoising step (cf_tf_*; needs a counterfactual,
    # capture.trajectory and an expert-1 stream), as --counterfactual-teacher-forced does.
    teacher_forced: bool = False
    # Keep the observation's images (``observation/image`` / ``observation/wrist_image``) as ``image`` /
    # ``wrist_image``, as the LIBERO collection does: what `openpi.latents.replay` re-runs through a control model.
    store_images: bool = False

    def __post_init__(self) -> None:
        if self.counterfactual not in ("none", "blank", "other-task"):
            raise ValueError(f"counterfactual must be 'none', 'blank' or 'other-task', got {self.counterfactual!r}.")
        if self.counterfactual == "other-task" and len(self.prompts) < 2:
            raise ValueError("counterfactual='other-task' needs two prompts or more.")
        if self.n_episodes < 1 or self.n_steps < 1:
            raise ValueError(f"n_episodes and n_steps must be >= 1, got {self.n_episodes} and {self.n_steps}.")
        check_teacher_forced(self.teacher_forced, self.counterfactual, self.capture, _TEACHER_FORCED_FIELDS)

    def counterfactual_prompt(self, task_id: int, k: int) -> str | None:
        """The rerun prompt of episode `k` of `task_id` (None: no rerun)."""
        if self.counterfactual == "none":
            return None
        if self.counterfactual == "blank":
            return ""
        return self.prompts[other_task_draw(self.seed, task_id, k, len(self.prompts))]


def manifest(spec: SyntheticCollection, policy: Policy, extra: dict[str, Any] | None = None) -> RunManifest:
    """The run manifest, with the keys the analysis reads (capture_spec, checkpoint, model_config, layout); ``extra``
    sets further entries (a field's name sets the field)."""
    config = policy.model.config
    meta = policy.metadata
    return RunManifest(
        kind="pi0 synthetic-observation latent collection",
        arguments={
            "prompts": list(spec.prompts),
            "n_episodes": spec.n_episodes,
            "n_steps": spec.n_steps,
            "counterfactual": spec.counterfactual,
            "num_steps": spec.num_steps,
            "seed": spec.seed,
            "counterfactual_teacher_forced": spec.teacher_forced,
            "store_images": spec.store_images,
        },
        capture_spec=spec.capture.to_dict(),
        checkpoint=meta.get("checkpoint"),
        preset=meta.get("preset"),
        model_config=config.describe(),
        suite="synthetic",
        max_steps=spec.n_steps,
        **config.layout.manifest_fields(),  # text_start, segment_names, suffix_segment_names
    ).updated(extra or {})


def _episode(policy: Policy, spec: SyntheticCollection, observe: Observe, task_id: int, k: int, writer) -> bool | list:
    """Runs one episode into `writer`; returns (raw observations, results) for the judge."""
    config = policy.model.config
    rng = np.random.default_rng([spec.seed, task_id, k])
    prompt, cf_prompt = spec.prompts[task_id], spec.counterfactual_prompt(task_id, k)
    raws, results = [], []
    for t in range(spec.n_steps):
        obs = {**observe(rng, prompt), "prompt": prompt}
        noise = rng.standard_normal((config.action_horizon, config.action_dim), dtype=np.float32)
        result = policy.infer_with_latents(obs, noise=noise, capture=spec.capture)
        record = base_record(t, obs, result, replan_steps=config.action_horizon, state_key="observation/state")
        if spec.store_images:
            record.update({key: obs[f"observation/{key}"] for key in ("image", "wrist_image")})
        if cf_prompt is not None:  # the LIBERO collection's reruns (recording.reruns), without an intervention
            inference = rerun_with_prompt(policy, Inference(obs, result), cf_prompt, spec.capture)
            if spec.teacher_forced:
                tf = teacher_forced_rerun(policy, inference, cf_prompt, spec.capture)
                inference = dataclasses.replace(inference, teacher_forced=tf)
            record.update(counterfactual_fields(inference))
        writer.append_step(record)
        raws.append(obs)
        results.append(result)
    return raws, results


def collect_synthetic(
    policy: Policy,
    output_dir: str | pathlib.Path,
    spec: SyntheticCollection,
    observe: Observe,
    *,
    judge: Judge | None = None,
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Runs `policy` on ``observe``'s observations for every prompt and episode, writing a latent store."""
    output_dir = pathlib.Path(output_dir)
    run_manifest = manifest(spec, policy, manifest_extra)
    bar = tqdm.tqdm(total=len(spec.prompts) * spec.n_episodes, desc="episodes", unit="ep", disable=not progress)
    with _store.LatentStoreWriter.create_or_open(output_dir, run_manifest, resume=False) as writer:
        for task_id, prompt in enumerate(spec.prompts):
            task = {"task_id": task_id, "task_name": f"prompt_{task_id}", "suite": "synthetic", "language": prompt}
            for k in range(spec.n_episodes):
                attrs = {
                    "init_state_index": k,
                    "seed": spec.seed,
                    "prompt": prompt,
                    "max_steps": spec.n_steps,
                    "counterfactual_prompt": spec.counterfactual_prompt(task_id, k),
                    # the observations are drawn from default_rng([seed, task_id, k]): that is the initial state
                    "init_state_hash": state_digest(np.array([spec.seed, task_id, k])),
                }
                ep = writer.begin_episode(task, k, attrs)
                raws, results = _episode(policy, spec, observe, task_id, k, ep)
                success = bool(judge(prompt, raws, results)) if judge is not None else False
                ep.finish(
                    {"success": success, "total_steps": spec.n_steps, "error": None, "num_inferences": spec.n_steps}
                )
                bar.update(1)
    bar.close()
    return output_dir
