"""The latent collection: run a policy preset in its simulator and record its latents at every inference.

Modules: `args` (CollectionArgs, make_plan, SetupError), `outputs` (the zarr store or pickle files, check_output),
`sizes` (what is captured, size estimates), `disk` (full disk, free-space warning), `episode` (one recorded
episode, the counterfactual rerun), `run` (collect, the summary table), `interrupt` (SIGINT / SIGTERM stop
cleanly), `malloc` (glibc arena cap). `scripts/inference_latent_collection.py` is the CLI.
"""

from openpi.latents.collect.args import RESUME_IGNORE, CollectionArgs, Plan, SetupError, make_plan
from openpi.latents.collect.disk import NoSpaceError
from openpi.latents.collect.episode import run_task_episode
from openpi.latents.collect.interrupt import Interrupted, StopOnSignal
from openpi.latents.collect.malloc import limit_malloc_arenas
from openpi.latents.collect.outputs import EpisodeOutcome, check_output
from openpi.latents.collect.run import collect, summary_table
from openpi.latents.collect.sizes import describe_capture, estimate_size, latent_shapes

__all__ = [
    "RESUME_IGNORE",
    "CollectionArgs",
    "EpisodeOutcome",
    "Interrupted",
    "NoSpaceError",
    "Plan",
    "SetupError",
    "StopOnSignal",
    "check_output",
    "collect",
    "describe_capture",
    "estimate_size",
    "latent_shapes",
    "limit_malloc_arenas",
    "make_plan",
    "run_task_episode",
    "summary_table",
]
