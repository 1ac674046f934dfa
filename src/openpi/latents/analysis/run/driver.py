"""Language-loss analysis of a collection, streamed one layer at a time: :func:`analyze_collection`.

It walks streams → layers → episodes → blocks of rollout steps and reads, per block, one layer of one stream
(``read(task, episode, key, layer=l, steps=block)``), so memory is bounded by a block of one layer
(``max_block_bytes``), never a whole episode. Each block goes to every metric of
:data:`openpi.latents.analysis.metrics.registry.REGISTRY` that applies to the stream; this module only reads, feeds the
metrics and keeps their small per-step results (:class:`openpi.latents.analysis.run.result.CollectionAnalysis`), plus
the task probe's features, the action-chunk divergence and expert 1 per denoising step (``denoise_sensitivity``).

expert_0 counts valid cameras only (``segment_mask``; see :mod:`openpi.latents.analysis.data.streams`): a masked
camera's image positions are left out of prompt sensitivity and drift, and its block out of the probe features. expert_1
drift is taken at the last captured denoising step (see the registry's ``drift``).

Episodes with no rollout step (env.reset failed: stored with an error and no steps) get empty rows and are skipped;
streams are discovered from the first episode with steps; both are reported (``source["episodes_without_steps"]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data import labels
from openpi.latents.analysis.data import source as src
from openpi.latents.analysis.data import streams as S
from openpi.latents.analysis.data.embedding import TokenEmbedding, token_embedding_for_manifest
from openpi.latents.analysis.measures import precision_floor as PF
from openpi.latents.analysis.metrics import pooled_rows as P
from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.metrics import step as SM
from openpi.latents.analysis.run import denoise_sensitivity as DS
from openpi.latents.analysis.run.result import WINDOWS, CollectionAnalysis, EpisodeRef
from openpi.latents.store.manifest import RunManifest

logger = logging.getLogger(__name__)


def _blocks(n: int, step_bytes: int, max_bytes: int) -> list[list[int]]:
    size = max(1, max_bytes // max(step_bytes, 1))
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _episodes(source) -> list[EpisodeRef]:
    out = []
    for t in source.task_ids():
        for k in source.episode_indices(t):
            meta = source.metadata(t, k)
            steps = source.step_t(t, k)
            out.append(
                EpisodeRef(
                    t,
                    k,
                    bool(meta.get("success", False)),
                    len(steps),
                    tuple(steps),
                    meta.get("prompt"),
                    meta.get("counterfactual_prompt"),
                    # no reported outcome (a policy-server episode whose harness sent none): left out of the split
                    meta.get("error") or ("no success reported" if meta.get("success", False) is None else None),
                )
            )
    return out


def resolve_embedding(source, embedding) -> tuple[TokenEmbedding | None, str | None]:
    """``embedding`` if given, else the checkpoint leaves named by the source's manifest; (None, reason) if neither."""
    if isinstance(embedding, TokenEmbedding):
        return embedding, None
    if embedding is not None and embedding != "auto":
        raise TypeError("embedding must be a TokenEmbedding, 'auto' or None")
    if embedding is None:
        return None, "text decoding skipped: no token embedding given"
    try:
        return token_embedding_for_manifest(source.manifest), None
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        return (
            None,
            f"text decoding skipped: the token embedding could not be read from the manifest's checkpoint ({e})",
        )


def _discover(source, episodes: list[EpisodeRef]) -> tuple[dict, dict, dict, dict]:
    """(streams, missing, notes, denoise) from the first episode with rollout steps."""
    first = next((e for e in episodes if e.n_steps > 0), None)
    if first is None:
        why = f"no episode has a rollout step (all {len(episodes)} ended before their first inference)"
        return {}, dict.fromkeys(S.STREAMS, why), {}, {}
    fields = source.fields(first.task_id, first.episode)
    streams, missing = S.discover_streams(fields, source.manifest)
    notes: dict[str, str] = {}
    for name, stream in streams.items():
        if stream.layer_note:
            notes[f"{name}.layers"] = stream.layer_note
        if stream.segment_note:
            notes[f"{name}.cameras"] = stream.segment_note
    denoise: dict[str, Any] = {}
    if "expert_1" in streams:
        n_s = fields[streams["expert_1"].key or "attention_to_text"][0][0]
        ids, kind, note = labels.resolve_denoise_steps(source.manifest, n_s)
        denoise = {"ids": list(ids), "kind": kind}
        if note:
            notes["expert_1.denoise_steps"] = note
    return streams, missing, notes, denoise


def _source_info(source, episodes: list[EpisodeRef], emb: TokenEmbedding | None, denoise: dict) -> dict[str, Any]:
    return {
        "root": source.root,
        "manifest": source.manifest,
        "n_tasks": len({e.task_id for e in episodes}),
        "n_episodes": len(episodes),
        "embedding": None if emb is None else emb.source,
        "episodes_without_steps": [
            {"task_id": e.task_id, "episode": e.episode, "error": e.error} for e in episodes if e.n_steps == 0
        ],
        "n_errored": sum(e.error is not None for e in episodes),
        "denoise_steps": denoise or None,
    }


def analyze_collection(
    data: Any,
    *,
    embedding: TokenEmbedding | str | None = "auto",
    task_ids=None,
    probe: bool = True,
    probe_splits: int = 5,
    probe_shuffles: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    text_step_stride: int = 1,
    max_block_bytes: int = 64 << 20,
    success_window: str = "step",
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    skip_damaged: bool = False,
    n_permutations: int = 1000,
    progress_bins: int = 10,
    include_constant_tokens: bool = False,
    pooled: bool = True,
    pooled_split: str = "task",
    pooled_steps_per_episode: int = 2,
    control: Any = None,
    control_label: str | None = None,
    control_embedding: TokenEmbedding | str | None = "auto",
) -> CollectionAnalysis:
    """Computes every registered metric per stream and layer for a collection (store path, task data, ...).

    Args:
        data: a store directory, a pickle path (with ``allow_pickle``), a ``LatentStore``, task data or ``{id: task}``.
        embedding: the :class:`TokenEmbedding` for text decoding; "auto" reads it from the manifest's checkpoint;
            None skips text decoding (reported with the reason).
        probe: run the task probe (needs two tasks or more); ``probe_splits`` folds, ``probe_shuffles`` logistic
            shuffled-label refits (the control level drawn in the figures).
        n_permutations: permutations of the probe's p-value (a ridge classifier refit in closed form: floor
            1/(n+1)) and of the within-task success test.
        n_boot, seed: bootstrap resamples (of tasks: the unit of resampling) and seed for every interval.
        text_step_stride: decode text at every k-th rollout step only (text decoding dominates the cost at full size).
        max_block_bytes: rollout steps of one layer read per block (bounds memory).
        success_window: "step" (default): success vs failure at equal rollout steps among the episodes still
            running, within task (``equal_step``; episode length cannot make a gap); "progress": every episode by
            normalised progress (``progress_bins`` bins; a secondary view, confounded by episode length); "common":
            the first N rollout steps, N = the fewest any episode has; "all": each episode's own steps.
        include_constant_tokens: keep BOS and the trailing "\n" in text decoding, the text probe and attention to
            text (default: left out; they are the same for every prompt).
        skip_damaged: a store path with damaged episodes is refused (listing them) unless this skips them.
        pooled: compute the pooled metrics (registry scope "pooled": token probe, tuned lens, CKA, effective rank) on
            ``pooled_steps_per_episode`` evenly spaced rollout steps of every episode, held out by ``pooled_split``
            ("task", default, or "episode").
        control: a control collection (same kinds of ``data``; e.g. :mod:`openpi.latents.replay`'s re-run of
            this collection's observations with a random-initialised model), analysed with the same settings and
            shown beside this one (``res.control``); ``control_label`` names it (default: its manifest checkpoint);
            ``control_embedding``: the control model's own token embedding ("auto": from the control's manifest, a
            ``random(seed=N)`` checkpoint re-created from its model_config; None when ``embedding`` is None).
    """
    t0 = time.monotonic()
    if success_window not in WINDOWS:
        raise ValueError(f"success_window must be one of {WINDOWS}, got {success_window!r}")
    if progress_bins < 1:
        raise ValueError(f"progress_bins must be >= 1, got {progress_bins}")
    if pooled_split not in ("task", "episode"):
        raise ValueError(f"pooled_split must be 'task' or 'episode', got {pooled_split!r}")
    if pooled_steps_per_episode < 1:
        raise ValueError(f"pooled_steps_per_episode must be >= 1, got {pooled_steps_per_episode}")
    source = src.make_source(data, task_ids=task_ids, allow_pickle=allow_pickle, skip_damaged=skip_damaged)
    episodes = _episodes(source)
    if not episodes:
        raise ValueError(f"{source.root}: no complete episode to analyse")
    streams, missing, notes, denoise = _discover(source, episodes)
    emb, why = resolve_embedding(source, embedding) if "text_only" in streams else (None, None)
    if why:
        for m in R.TEXT_DECODING_METRICS:
            missing[f"text_only.{m}"] = why
    settings = dict(
        n_boot=n_boot,
        seed=seed,
        probe_splits=probe_splits,
        probe_shuffles=probe_shuffles,
        text_step_stride=text_step_stride,
        max_block_bytes=max_block_bytes,
        success_window=success_window,
        n_permutations=n_permutations,
        progress_bins=progress_bins,
        include_constant_tokens=include_constant_tokens,
        **_pooled_settings(pooled, pooled_split, pooled_steps_per_episode),
    )
    res = CollectionAnalysis(
        _source_info(source, episodes, emb, denoise), episodes, streams, missing, {}, {}, {}, {}, settings, notes=notes
    )
    say = progress or (lambda msg: logger.info(msg))
    _analyze_streams(source, res, emb, probe, say, t0)
    _action_divergence(source, res)
    DS.analyze_denoise_sensitivity(source, res)  # expert 1 per denoising step, free-running and teacher-forced
    if pooled:
        P.analyze_pooled(source, res, emb, [m for m in R.REGISTRY if m.scope == "pooled"], say)
    if control is not None:
        kw = dict(task_ids=task_ids, probe=probe, probe_splits=probe_splits, probe_shuffles=probe_shuffles)
        kw |= dict(text_step_stride=text_step_stride, max_block_bytes=max_block_bytes, allow_pickle=allow_pickle)
        kw |= dict(success_window=success_window, progress=progress, skip_damaged=skip_damaged)
        _analyze_control(res, control, control_label, None if embedding is None else control_embedding, kw)
    res.timings["total_s"] = time.monotonic() - t0
    return res


def _analyze_control(res: CollectionAnalysis, control, label: str | None, embedding, kw: dict) -> None:
    """The control collection, analysed with ``res``'s settings, into ``res.control`` / ``res.control_label``."""
    st = res.settings
    kw |= dict(n_boot=st["n_boot"], seed=st["seed"], pooled=st["pooled"], pooled_split=st["pooled_split"])
    res.control = analyze_collection(
        control, embedding=embedding, pooled_steps_per_episode=st["pooled_steps_per_episode"], **kw
    )
    res.control_label = label or str(RunManifest.of(res.control.source["manifest"]).checkpoint or "control")


def _pooled_settings(pooled: bool, split: str, steps_per_episode: int) -> dict[str, Any]:
    """The pooled metrics' settings (openpi.latents.analysis.metrics.pooled_rows): sample, held-out unit, row caps."""
    return dict(
        pooled=pooled,
        pooled_split=split,
        pooled_steps_per_episode=steps_per_episode,
        pooled_max_rows=4000,  # rows per layer (subsampled with the seed, the same rows for every layer)
        cka_rows=1000,  # rows behind each CKA gram ([N, N] float64 per stored layer)
        lens_eval_rows=512,  # held-out rows the tuned lens decodes against the whole vocabulary
        token_probe_control="slot",
    )


def _analyze_streams(source, res: CollectionAnalysis, emb, probe: bool, say: Callable[[str], None], t0: float) -> None:
    n_tasks = res.source["n_tasks"]
    for name, stream in res.streams.items():
        for j in range(stream.n_layers):
            feats = _analyze_layer(source, res, stream, j, emb)
            if probe and feats is not None:
                res.probes.setdefault(name, []).append(_probe(res, feats, n_tasks))
            say(f"{name} layer {stream.layers[j]}: done ({time.monotonic() - t0:.1f}s)")
        if not stream.has_cf and stream.key is not None:
            res.missing[f"{name}.prompt_sensitivity"] = (
                "no counterfactual reruns in this collection (collect with --counterfactual blank|other-task)"
            )
    if probe and n_tasks < 2:
        res.missing["probe"] = f"the task probe needs two tasks or more; this collection has {n_tasks}"


def _put(res: CollectionAnalysis, stream: S.Stream, metric: str, ep_i: int, rows, j: int, values) -> None:
    lst = res.step_values.setdefault(
        (stream.name, metric), [np.full((e.n_steps, stream.n_layers), np.nan) for e in res.episodes]
    )
    lst[ep_i][rows, j] = values


def _run(metrics: list[R.Metric], block: R.LayerBlock) -> None:
    for metric in metrics:
        out = metric.compute(block)
        if out is not None:
            _put(block.res, block.stream, metric.name, block.ep_index, out[0], block.layer, out[1])


class _ProbeRows:
    """The task probe's features of one layer, gathered block by block."""

    def __init__(self):
        self.feats, self.labels, self.groups, self.cams = [], [], [], []

    def add(self, stream: S.Stream, block: R.LayerBlock, cam: np.ndarray | None) -> None:
        text_mask = block.mask if stream.name == "text_only" else None
        if text_mask is not None and not block.res.settings.get("include_constant_tokens", False):
            text_mask = M.informative_text_mask(text_mask)  # BOS and "\n": the same for every prompt
        self.feats.append(S.probe_features(stream, block.x, text_mask, cam))
        self.labels += [block.episode.task_id] * len(self.feats[-1])
        self.groups += [block.ep_index] * len(self.feats[-1])
        if cam is not None:
            self.cams.append(cam.reshape(-1, stream.n_cams))

    def result(self, stream: S.Stream):
        if not self.feats:
            return None
        cams = np.concatenate(self.cams) if self.cams else None
        x = S.drop_invalid_cameras(stream, np.concatenate(self.feats), cams)
        return x, np.asarray(self.labels), np.asarray(self.groups)


def _read_block(block: R.LayerBlock, seg_stored: bool) -> np.ndarray | None:
    """Reads the block's states and valid positions into ``block``; returns expert_0's camera validity."""
    stream = block.stream
    block.x = S.states(stream, block.read(stream.key, layer=block.layer))
    if stream.name == "text_only":
        block.mask = block.read("text_mask").astype(bool)
        return None
    if stream.name != "expert_0":
        return None
    # valid cameras only: a masked camera's states are meaningless
    cam = S.camera_valid(stream, block.read("segment_mask") if seg_stored else None, block.x.shape[:2])
    block.mask = S.position_mask(stream, cam)
    return cam


def _analyze_layer(source, res: CollectionAnalysis, stream: S.Stream, j: int, emb: TokenEmbedding | None):
    """Every registered metric of one layer of one stream over every episode; returns the probe features."""
    block_metrics = [m for m in R.REGISTRY if m.scope == "block" and R.applies(m, stream, emb)]
    episode_metrics = [m for m in R.REGISTRY if m.scope == "episode" and R.applies(m, stream, emb)]
    probe = _ProbeRows()
    mean = _layer_mean(source, res, stream, j) if any(m.needs_layer_mean for m in block_metrics) else None
    for ep_i, ep in enumerate(res.episodes):
        if ep.n_steps == 0:  # env.reset failed: no rollout step (its rows stay empty / NaN)
            continue
        fields = source.fields(ep.task_id, ep.episode)
        common = dict(source=source, res=res, stream=stream, ep_index=ep_i, episode=ep, layer=j, fields=fields)
        if stream.key is not None and stream.key in fields:
            shape, dims = fields[stream.key]
            per_step = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float32)  # read as float32
            carry: dict[str, Any] = {}
            for steps in _blocks(ep.n_steps, per_step, res.settings["max_block_bytes"]):
                block = R.LayerBlock(**common, steps=steps, embedding=emb, carry=carry, layer_mean=mean)
                cam = _read_block(block, "segment_mask" in fields)
                if len(res.precision_floor.get(stream.name, ())) == j and _stored_bf16(res):  # first block only
                    x = SM.drift_states(stream, block.x)
                    valid = None if block.mask is None else np.broadcast_to(block.mask, x.shape[:-1])
                    floor = PF.floors(x if valid is None else x[valid], seed=res.settings["seed"])
                    res.precision_floor.setdefault(stream.name, []).append(floor)
                _run(block_metrics, block)
                probe.add(stream, block, cam)
        _run(episode_metrics, R.LayerBlock(**common, steps=None, embedding=emb))
    return probe.result(stream)


def _stored_bf16(res: CollectionAnalysis) -> bool:
    """Hidden states stored in bfloat16 (the capture's default) rather than float32 / float16."""
    spec = res.source.get("manifest", {}).get("capture_spec") or {}
    return spec.get("dtype", "bfloat16") == "bfloat16"


def _layer_mean(source, res: CollectionAnalysis, stream: S.Stream, j: int) -> np.ndarray | None:
    """[W] float64 mean of the layer's drift states over every valid position, rollout step and episode (a first
    pass over the layer: centred drift needs the centre before its first block)."""
    total, count = None, 0
    for ep_i, ep in enumerate(res.episodes):
        fields = source.fields(ep.task_id, ep.episode)
        if ep.n_steps == 0 or stream.key is None or stream.key not in fields:
            continue
        common = dict(source=source, res=res, stream=stream, ep_index=ep_i, episode=ep, layer=j, fields=fields)
        shape, dims = fields[stream.key]
        per_step = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float32)
        for steps in _blocks(ep.n_steps, per_step, res.settings["max_block_bytes"]):
            block = R.LayerBlock(**common, steps=steps)
            _read_block(block, "segment_mask" in fields)
            x = SM.drift_states(stream, block.x).astype(np.float64)
            valid = np.ones(x.shape[:-1], bool) if block.mask is None else np.broadcast_to(block.mask, x.shape[:-1])
            part = x[valid].sum(0)
            total = part if total is None else total + part
            count += int(valid.sum())
    return None if not count else total / count


def _probe(res: CollectionAnalysis, feats, n_tasks: int) -> M.ProbeResult:
    x, y, g = feats
    s = res.settings
    return M.task_probe(
        x,
        y,
        g,
        n_splits=s["probe_splits"],
        n_shuffles=s["probe_shuffles"] if n_tasks > 1 else 0,
        seed=s["seed"],
        n_permutations=s["n_permutations"] if n_tasks > 1 else 0,
    )


def _action_divergence(source, res: CollectionAnalysis) -> None:
    res.actions = {"mean_l2": [], "max_abs": []}
    cf_actions = schema.counterfactual("actions")
    for ep in res.episodes:
        l2, mx = np.full(ep.n_steps, np.nan), np.full(ep.n_steps, np.nan)
        fields = source.fields(ep.task_id, ep.episode)
        if cf_actions in fields and "actions" in fields:
            steps = source.present_steps(ep.task_id, ep.episode, cf_actions)
            if steps:
                d = M.action_divergence(
                    source.read(ep.task_id, ep.episode, "actions", steps=steps),
                    source.read(ep.task_id, ep.episode, cf_actions, steps=steps),
                )
                l2[steps], mx[steps] = d.mean_l2, d.max_abs
        res.actions["mean_l2"].append(l2)
        res.actions["max_abs"].append(mx)
    if not any(np.any(~np.isnan(v)) for v in res.actions["mean_l2"]):
        res.missing["action_divergence"] = "no counterfactual reruns (cf_actions) in this collection"
