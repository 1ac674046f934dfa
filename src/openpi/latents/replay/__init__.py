"""The matched control collection: a stored collection's observations re-run through another policy (issue 10).

A control answers "is this a property of the trained model, or of the inputs and the architecture?". A random model
run closed-loop would not answer it: it fails at once and sees other scenes, so its states differ by input as well as
by weights. The replay keeps the inputs: every committed rollout step of every complete source episode is re-run
through the control policy with the step's stored images, state, prompt and noise (and, where the source has them,
the counterfactual rerun with the stored ``cf_prompt`` and the teacher-forced rerun), with the source's capture spec
and denoising steps. The control store has the source's tasks, episodes, rollout steps (same ``t``) and record keys.
What the scene and the rollout loop produced is copied (``t``, ``prompt``, ``state``, the images, a server's
``received_time`` / ``sent_prompt``, and ``executed_actions``: the *source's* actions, which moved the robot between
these observations; the control never acts), as are the episode attrs and outcomes; everything the model produces
(``actions``, ``model_actions``, the latents, every ``cf_*`` key) is the control's.

The control model (:class:`ReplayArgs`): by default a random-initialised model of the source's config, params from
``init_seed`` (``jax.random.key(seed)``, as a preset without a checkpoint), with the source's norm stats (both models
get the same normalised inputs); or ``checkpoint``, a second checkpoint of the same config with its own norm stats.
The manifest records it as ``checkpoint`` (``random(seed=N)`` or the path: the analysis reads the control's token
embedding from it) and what the store is a control of under ``control_of`` (source path, content hash, checkpoint).

Known answer: replayed with the source's own model, the source's stored actions and latents come back bit for bit
(same uint8 images, float32 state, token ids and noise through the same jitted program on the same backend), unless
the source was collected with batched inference (float rounding; ``replay.source_batched`` in the manifest).
Every check runs before the model loads; writing uses the store's commit protocol (a commit per rollout step), and
``resume`` keeps the finished episodes and re-runs an unfinished one.
"""

from openpi.latents.replay.plan import KIND, ReplayArgs, ReplayPlan, check_output, load_policy, make_plan
from openpi.latents.replay.run import ReplaySummary, replay, replay_step

__all__ = [
    "KIND",
    "ReplayArgs",
    "ReplayPlan",
    "ReplaySummary",
    "check_output",
    "load_policy",
    "make_plan",
    "replay",
    "replay_step",
]
