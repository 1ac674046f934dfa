"""Expert-1 prompt sensitivity per denoising step × layer, free-running and teacher-forced, side by side.

The counterfactual rerun (``cf_*``) starts from the baseline's observation and noise, but after denoising step 0 its
x_t follows its own velocities, so step s > 0 of the two runs sees different action inputs: even layer 0 (the embedded
input: state, x_t and time, no prompt) then differs. That part is trajectory divergence, not the prompt acting on the
step. The teacher-forced rerun (``cf_tf_*``, collected with ``--counterfactual-teacher-forced``) is fed the
baseline's x_t at every step, so it differs from the baseline by the prompt alone; its layer-0 sensitivity is exactly 0
by construction, and it is the control of the free-running variant.

Definition (per variant v ∈ {free: ``cf_``, teacher_forced: ``cf_tf_``}, captured denoising step s, stored layer l):

* per rerun r (a rollout step with that rerun): ``sens_r[s, l] = ‖a − b‖_F / ‖a‖_F`` over the action tokens, batch
  and width of ``expert_1`` at (s, l), a = the baseline run, b = the rerun under the counterfactual prompt (float64;
  NaN where ‖a‖ = 0). Action tokens: pi0's suffix tokens 1: (full capture) or the mean action token (pooled segment
  1); pi0's state token (suffix token 0) is left out: it attends only to the prefix and itself and its input has no
  x_t or time, so it is identical at every denoising step by construction and would only repeat one number per step.
  pi0.5 has no state token: every suffix token (both pooled segments) counts.
* per episode: the mean of ``sens_r`` over its reruns (NaN for an episode without a rerun of that variant);
* per collection: the mean over episodes, with a 95% percentile interval from resampling tasks (episodes of one task
  share prompt and scene; one task: its episodes are resampled and ``unit`` says "episode"), per cell, no correction
  for the S × L cells (the intervals are not simultaneous).

A variant whose keys the collection lacks is reported as NaN with the reason (:attr:`DenoiseSensitivity.reason`).
Reads one layer of one episode at a time, in blocks of reruns of at most ``settings.read.max_block_bytes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.stats.clustered import cluster_bootstrap_ci
from openpi.latents.store.manifest import RunManifest

if TYPE_CHECKING:
    from openpi.latents.analysis.run.result import CollectionAnalysis

METRIC = "prompt_sensitivity_by_denoise_step"  # its name in metrics.json and res.missing
DEFINITION = (
    "expert-1 prompt sensitivity per captured denoising step s and stored layer l: per rerun ‖a − b‖_F/‖a‖_F over "
    "the action tokens (pi0's state token left out: identical at every denoising step by construction), a = the "
    "baseline, b = the rerun under the counterfactual prompt with the same observation and noise; mean over an "
    "episode's reruns, then over episodes (task-bootstrap interval). free-running (cf_): the rerun follows its own "
    "x_t, so after step 0 even layer 0 (the embedded input) differs by trajectory divergence; teacher-forced "
    "(cf_tf_, the control): the rerun is fed the baseline's x_t at every step, so only the prompt differs and layer 0 "
    "is exactly 0"
)
VARIANTS = {"free": schema.counterfactual, "teacher_forced": schema.teacher_forced}
_NO_TF = (
    "no teacher-forced reruns (cf_tf_*) in this collection: collect with --counterfactual-teacher-forced (needs "
    "--counterfactual blank|other-task and the trajectory in --capture)"
)


@dataclasses.dataclass(frozen=True)
class DenoiseSensitivity:
    """One variant of expert-1 prompt sensitivity per denoising step × layer (definition: the module docstring).

    ``estimate``, ``low``, ``high``: [S, L] (captured denoising steps × stored layers; all NaN with ``reason`` when the
    variant is missing). ``per_episode`` [episodes, S, L]. ``n_episodes`` / ``n_tasks``: episodes / tasks with a
    value (the same for every cell), ``n_reruns``: reruns behind the estimate, ``unit``: "task" or "episode".
    """

    variant: str  # "free" | "teacher_forced"
    key: str | None  # the rerun's stored key (cf_<key> / cf_tf_<key>)
    tokens: str  # which suffix tokens were compared
    layers: tuple[int, ...]
    denoise_steps: tuple[int, ...]
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    per_episode: np.ndarray
    n_episodes: int
    n_tasks: int
    n_reruns: int
    unit: str | None
    reason: str | None = None
    first_is_input: bool = False  # the first stored layer is model layer 0, the embedded input (0 when teacher-forced)


def _tokens(stream, manifest: RunManifest | Mapping[str, Any]) -> tuple[slice, str]:
    """The suffix tokens compared (an index into the token / segment axis) and their description."""
    names = RunManifest.of(manifest).suffix_segment_names
    pi0 = names is None or names[0] == "state"  # no names (older stores): pi0, the only model that had none
    if not pi0:
        return slice(None), "every suffix token (pi0.5: no state token)"
    if stream.mode == "pooled":
        return slice(1, 2), "the mean action token (pooled segment 1); pi0's state token left out"
    return slice(1, None), "the action tokens (suffix tokens 1:); pi0's state token left out"


def _block_rows(n: int, per_rerun_bytes: int, max_bytes: int) -> list[slice]:
    size = max(1, max_bytes // max(per_rerun_bytes, 1))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _episode_sums(source, res: CollectionAnalysis, stream, ep, key: str, cf_key: str, tokens: slice):
    """[S, L] sums over the episode's reruns of sens_r, and the number of reruns."""
    steps = source.present_steps(ep.task_id, ep.episode, cf_key)
    fields = source.fields(ep.task_id, ep.episode)
    shape, dims = fields[key]
    n_s = shape[0]
    total, n = np.zeros((n_s, stream.n_layers)), len(steps)
    if not n:
        return total, 0
    per_rerun = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float64) * 2
    for j in range(stream.n_layers):
        for rows in _block_rows(n, per_rerun, res.settings.read.max_block_bytes):
            chunk = steps[rows]
            a = source.read(ep.task_id, ep.episode, key, layer=j, steps=chunk)[..., tokens, :]  # [R, S, B, tok, W]
            b = source.read(ep.task_id, ep.episode, cf_key, layer=j, steps=chunk)[..., tokens, :]
            sens = np.asarray(M.prompt_sensitivity(a, b, keep_axes=(0, 1)), np.float64).reshape(len(chunk), n_s)
            total[:, j] += sens.sum(0)  # a NaN rerun (‖a‖ = 0) makes its cell NaN: undefined, not dropped
    return total, n


def _missing(variant: str, key: str | None, tokens: str, layers, steps, n_eps: int, reason: str) -> DenoiseSensitivity:
    nan = np.full((len(steps), len(layers)), np.nan)
    per_ep = np.full((n_eps, len(steps), len(layers)), np.nan)
    return DenoiseSensitivity(variant, key, tokens, tuple(layers), tuple(steps), nan, nan, nan, per_ep, 0, 0, 0, None,
                              reason)  # fmt: skip


def _variant(source, res: CollectionAnalysis, variant: str) -> DenoiseSensitivity:
    stream = res.streams.get("expert_1")
    ids = tuple((res.source.get("denoise_steps") or {}).get("ids") or ())
    if stream is None or stream.key is None:
        why = res.missing.get("expert_1_hidden") or res.missing.get("expert_1") or "expert 1 not captured"
        return _missing(variant, None, "", (), ids, len(res.episodes), why)
    tokens, what = _tokens(stream, res.source["manifest"])
    cf_key = VARIANTS[variant](stream.key)
    per_ep = np.full((len(res.episodes), len(ids), stream.n_layers), np.nan)
    n_reruns = 0
    for i, ep in enumerate(res.episodes):
        if ep.n_steps == 0 or cf_key not in source.fields(ep.task_id, ep.episode):
            continue
        total, n = _episode_sums(source, res, stream, ep, stream.key, cf_key, tokens)
        if n:
            per_ep[i], n_reruns = total / n, n_reruns + n
    if not n_reruns:
        why = _NO_TF if variant == "teacher_forced" else (
            "no counterfactual reruns in this collection (collect with --counterfactual blank|other-task)"
        )  # fmt: skip
        return _missing(variant, cf_key, what, stream.layers, ids, len(res.episodes), why)
    tasks, nb, seed = res.task_ids(), res.settings.stats.n_boot, res.settings.stats.seed
    cis = [[cluster_bootstrap_ci(per_ep[:, s, j], tasks, n_boot=nb, seed=seed) for j in range(stream.n_layers)]
           for s in range(len(ids))]  # fmt: skip
    grid = {f: np.array([[getattr(c, f) for c in row] for row in cis], np.float64) for f in ("estimate", "low", "high")}
    has = ~np.all(np.isnan(per_ep.reshape(len(per_ep), -1)), axis=1)
    first_is_input = stream.layer_kind == "model" and stream.layers[0] == 0
    return DenoiseSensitivity(
        variant, cf_key, what, tuple(stream.layers), ids, grid["estimate"], grid["low"], grid["high"], per_ep,
        int(has.sum()), len(set(tasks[has].tolist())), n_reruns, cis[0][0].unit, None, first_is_input,
    )  # fmt: skip


def analyze_denoise_sensitivity(source, res: CollectionAnalysis) -> dict[str, DenoiseSensitivity]:
    """Both variants (``"free"``, ``"teacher_forced"``) of expert-1 prompt sensitivity per denoising step × layer
    (each with its reason where it has no values: the driver records it as missing ``expert_1.<METRIC>.<variant>``)."""
    return {v: _variant(source, res, v) for v in VARIANTS}
