"""Running a replay: each source rollout step re-run through the control policy and written to the control store."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from openpi.envs import base as env_base
from openpi.latents import schema
from openpi.latents import store as _store
from openpi.latents.recording.interrupt import StopOnSignal
from openpi.latents.recording.records import base_record, counterfactual_fields, teacher_forced_fields
from openpi.latents.recording.reruns import Inference, rerun_with_prompt, teacher_forced_rerun
from openpi.latents.replay.plan import (
    COPIED_STREAMS,
    KIND,
    RESUME_IGNORE,
    ReplayArgs,
    ReplayPlan,
    check_output,
    load_policy,
    make_plan,
)
from openpi.latents.store.format import RESERVED_EPISODE_ATTRS
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)


def _copied(key: str) -> bool:
    """Whether the replay copies ``key`` from the source record (schema-less keys are copied as they are)."""
    if schema.is_counterfactual(key):
        return False
    entry = schema.record_key(key)
    return entry is None or entry.stream in COPIED_STREAMS


def replay_step(plan: ReplayPlan, policy: Policy, ep: _store.EpisodeReader, s: int) -> dict[str, Any]:
    """The control record of rollout step ``s`` of source episode ``ep`` (the source's keys, see the docstring)."""
    keys = ep.keys_at(s)
    copied = {key: ep.read_step_value(key, s) for key in keys if _copied(key)}
    sim = plan.simulator
    element = {input_key: copied[key] for key, input_key in sim.camera_keys.items()}
    element |= {sim.state_key: copied["state"], env_base.PROMPT_KEY: str(copied["prompt"])}
    result = policy.infer_with_latents(element, noise=ep.read("noise", steps=s), capture=plan.capture)
    horizon = policy.model.config.action_horizon
    record = base_record(int(copied["t"]), element, result, replan_steps=horizon, state_key=sim.state_key)
    record |= copied
    inference = Inference(element, result)
    cf_prompt = schema.counterfactual("prompt")
    if cf_prompt in keys:
        prompt = str(ep.read_step_value(cf_prompt, s))
        inference = rerun_with_prompt(policy, inference, prompt, plan.capture)
        record |= counterfactual_fields(inference)
        if schema.teacher_forced("actions") in keys:
            record |= teacher_forced_fields(teacher_forced_rerun(policy, inference, prompt, plan.capture))
    lost = [key for key in keys if key not in record]
    if lost:
        raise RuntimeError(f"{ep.where} rollout step {s}: the replay made no {lost}, which the source recorded.")
    return {key: record[key] for key in keys}  # the source's keys only (a server record has no executed_actions)


def _episode_attrs(ep: _store.EpisodeReader) -> tuple[dict[str, Any], dict[str, Any]]:
    """(begin attrs, finish metadata) of the source episode; the replay's own wall time replaces the source's."""
    finish = {k: v for k, v in ep.record.attrs.items() if k not in ("prompt", "wall_time_s")}
    skip = set(ep.record.attrs) | RESERVED_EPISODE_ATTRS | {"episode_index"}
    static = {k: v for k, v in ep.attrs.items() if k not in skip}
    if "prompt" in ep.record.attrs and "prompt" not in ep.attrs:
        static["prompt"] = ep.record.attrs["prompt"]
    return static, finish


@dataclasses.dataclass(frozen=True)
class ReplaySummary:
    output_dir: str
    replayed: tuple[tuple[int, int], ...]
    kept: tuple[tuple[int, int], ...]  # complete in the output before this run (resume)
    steps: int


def replay(args: ReplayArgs, *, policy: Policy | None = None, stop: StopOnSignal | None = None) -> ReplaySummary:
    """Writes the control store of ``args.source``. Every check runs before the model loads (``policy``: use this
    one instead, e.g. in tests; it must sample the source's number of denoising steps). ``stop``: an active
    `StopOnSignal`; a signal stops after the step in flight, the unfinished episode left for ``--resume``."""
    plan = make_plan(args)
    check_output(plan)
    policy = load_policy(plan) if policy is None else policy
    stop = stop or StopOnSignal()
    replayed, kept, steps = [], [], 0
    with _store.LatentStoreWriter.create_or_open(
        args.output_dir,
        plan.manifest,
        resume=args.resume,
        queue_size=args.queue_size,
        resume_ignore=RESUME_IGNORE,
        break_stale_lock=args.break_stale_lock,
    ) as writer:
        stop.deferring = True
        try:
            for t, k in plan.episodes:
                if (t, k) in writer.completed:
                    kept.append((t, k))
                    continue
                ep = plan.source.episode(t, k)
                static, finish = _episode_attrs(ep)
                out = writer.begin_episode(plan.source.task_info(t), k, static)
                for s in range(ep.committed):
                    stop.check()
                    out.append_step(replay_step(plan, policy, ep, s))
                    steps += 1
                out.finish(finish)
                replayed.append((t, k))
                logger.info("task %d episode %d: %d rollout steps replayed", t, k, ep.committed)
        finally:
            stop.deferring = False
    return ReplaySummary(str(args.output_dir), tuple(replayed), tuple(kept), steps)


__all__ = ["KIND", "ReplayArgs", "ReplayPlan", "ReplaySummary", "check_output", "load_policy", "make_plan", "replay"]
