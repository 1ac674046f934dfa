"""The latent collection: run a policy preset in its simulator and record its latents at every inference.

Modules: `args` (CollectionArgs, make_plan, SetupError), `outputs` (the zarr store or pickle files, check_output),
`sizes` (what is captured, size estimates), `episode` (one recorded episode), `policy` (the run's policy), `run`
(collect, the summary table), `conditions` (closed-loop conditions: prompt modes, interventions, layer sweeps, text
latents), `sweep` (several conditions in one command, one store each),
`malloc` (glibc arena cap). What the collection shares with the server, the replay and the synthetic collection
(records, counterfactual reruns, noise, full disk, stopping on a signal) is in `openpi.latents.recording`.
`scripts/inference_latent_collection.py` is the CLI.
"""

from openpi.latents.collect.args import RESUME_IGNORE, CollectionArgs, Plan, SetupError, make_plan
from openpi.latents.collect.conditions import RECIPES, Condition, ConditionArgs
from openpi.latents.collect.episode import run_task_episode
from openpi.latents.collect.malloc import limit_malloc_arenas
from openpi.latents.collect.outputs import EpisodeOutcome, check_output
from openpi.latents.collect.run import collect, summary_table
from openpi.latents.collect.sizes import describe_capture, estimate_size, latent_shapes
from openpi.latents.collect.sweep import ConditionRun, collect_conditions, condition_args
from openpi.latents.recording.disk import NoSpaceError
from openpi.latents.recording.interrupt import Interrupted, StopOnSignal

__all__ = [
    "RECIPES",
    "RESUME_IGNORE",
    "CollectionArgs",
    "Condition",
    "ConditionArgs",
    "ConditionRun",
    "EpisodeOutcome",
    "Interrupted",
    "NoSpaceError",
    "Plan",
    "SetupError",
    "StopOnSignal",
    "check_output",
    "collect",
    "collect_conditions",
    "condition_args",
    "describe_capture",
    "estimate_size",
    "latent_shapes",
    "limit_malloc_arenas",
    "make_plan",
    "run_task_episode",
    "summary_table",
]
