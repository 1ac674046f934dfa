"""Several conditions in one command (a layer sweep, a condition with its baseline): one store per condition.

Layout: one condition (the usual case) writes its store at ``--output-dir`` exactly as a plain run does; several write
``<output-dir>/<condition name>/`` each (e.g. ``baseline/``, ``knockout-text@L0/`` ... ``knockout-text@L17/``), every
one a complete latent store whose manifest and episodes name the condition. Every condition is checked (arguments,
intervention, output directory) before the policy loads once for all of them.
"""

from __future__ import annotations

import dataclasses

from openpi.latents.collect import conditions as conditions_lib
from openpi.latents.collect.args import CLI_FLAGS, SETUP_ERRORS, CollectionArgs, Plan, SetupError, make_plan
from openpi.latents.collect.outputs import EpisodeOutcome, check_output
from openpi.latents.collect.policy import load_policy
from openpi.latents.collect.run import build_manifest, collect
from openpi.latents.recording.interrupt import StopOnSignal
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib
from openpi.policies import presets
from openpi.policies.policy import Policy
from openpi.shared.cli import cli_message


@dataclasses.dataclass(frozen=True)
class ConditionRun:
    name: str
    plan: Plan
    outcomes: list[EpisodeOutcome]


def condition_args(args: CollectionArgs) -> list[tuple[str, CollectionArgs]]:
    """(name, arguments) of each condition `args` stands for; several go to ``<output_dir>/<name>``."""
    depth = presets.get_preset(args.preset).model_config.depth
    expanded = conditions_lib.expand(args.condition, depth)
    names = [conditions_lib.condition_name(c) for c in expanded]
    if len(set(names)) != len(names):
        raise ValueError(f"The conditions repeat a name ({names}); give --condition.name or change the settings.")
    if len(expanded) == 1:
        return [(names[0], dataclasses.replace(args, condition=expanded[0]))]
    args = same_batching(args, expanded)
    root = location.as_path(args.output_dir)  # a local path or an s3:// / gs:// prefix
    return [
        (name, dataclasses.replace(args, condition=c, output_dir=str(root / name)))
        for name, c in zip(names, expanded, strict=True)
    ]


def is_batched(args: CollectionArgs, condition: conditions_lib.ConditionArgs) -> bool:
    """Whether the condition's inferences go through one padded model call with other envs' (`parallel`): with
    ``--num-envs > 1`` and ``--batch-inference``, unless the condition edits the model (interventions are never
    batched)."""
    edits = condition.intervention != "none" or condition.text_latent is not None
    return args.num_envs > 1 and args.batch_inference and not edits


def same_batching(args: CollectionArgs, conditions: list[conditions_lib.ConditionArgs]) -> CollectionArgs:
    """`args` with ``--no-batch-inference`` when the conditions would otherwise mix batched and unbatched runs.

    Batching alone moves bf16 actions by up to 0.016 (RMS 0.0045), above the divergence threshold, so a no-op
    intervention compared with a batched baseline would "diverge at t = 0". Every condition of one command then
    runs one observation per model call (the stored arrays equal the sequential run's)."""
    if len({is_batched(args, c) for c in conditions}) < 2:
        return args
    print(
        "note: these conditions mix interventions (never batched) with plain runs; all of them run with "
        "--no-batch-inference so that their action divergence compares runs under the same batching.",
        flush=True,
    )
    return dataclasses.replace(args, batch_inference=False)


def _check_all(args: CollectionArgs) -> list[tuple[str, Plan]]:
    runs = []
    for name, sub in condition_args(args):
        plan = make_plan(sub)
        plan.simulator.configure()
        check_output(plan, manifest_lib.complete_manifest(build_manifest(plan)))
        runs.append((name, plan))
    return runs


def collect_conditions(
    args: CollectionArgs, *, policy: Policy | None = None, stop: StopOnSignal | None = None
) -> list[ConditionRun]:
    """Runs every condition of `args` in turn (see the module docstring); one `ConditionRun` per condition.

    Every setup check of every condition runs first and raises `SetupError`; then the policy loads once.
    """
    try:
        runs = _check_all(args)
        if policy is None:
            policy = load_policy(runs[0][1])
    except SETUP_ERRORS as e:
        raise SetupError(cli_message(str(e), CLI_FLAGS)) from e
    out = []
    for name, plan in runs:
        if len(runs) > 1:
            print(f"\n=== condition {name} -> {plan.args.output_dir}", flush=True)
        out.append(ConditionRun(name, plan, collect(plan.args, policy=policy, stop=stop)))
    return out
