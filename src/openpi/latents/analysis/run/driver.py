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
from openpi.latents.analysis.data.episodes import EpisodeRef
from openpi.latents.analysis.measures import precision_floor as PF
from openpi.latents.analysis.metrics import pooled_rows as P
from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.metrics import step as SM
from openpi.latents.analysis.run import denoise_sensitivity as DS
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.analysis.run.settings import AnalysisSettings
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
    settings: AnalysisSettings | None = None,
    *,
    embedding: TokenEmbedding | str | None = "auto",
    progress: Callable[[str], None] | None = None,
    control: Any = None,
    control_label: str | None = None,
    control_embedding: TokenEmbedding | str | None = "auto",
    **overrides: Any,
) -> CollectionAnalysis:
    """Computes every registered metric per stream and layer for a collection (store path, task data, ...).

    Args:
        data: a store directory, a pickle path (with ``allow_pickle``), a ``LatentStore``, task data or ``{id: task}``.
        settings: how it is analysed (:class:`AnalysisSettings`: what is read, text decoding, the task probe,
            statistics, pooled metrics; definitions there); default ``AnalysisSettings()``.
        embedding: the :class:`TokenEmbedding` for text decoding; "auto" reads it from the manifest's checkpoint;
            None skips text decoding (reported with the reason).
        progress: called with one line per stream and layer done (default: the module's logger).
        control: a control collection (same kinds of ``data``; e.g. :mod:`openpi.latents.replay`'s re-run of
            this collection's observations with a random-initialised model), analysed with the very same ``settings``
            and shown beside this one (``res.control``); ``control_label`` names it (default: its manifest
            checkpoint); ``control_embedding``: the control model's own token embedding ("auto": from the control's
            manifest, a ``random(seed=N)`` checkpoint re-created from its model_config; None when ``embedding`` is
            None).
        overrides: settings by their flat names (``n_boot=100, probe=False``: :meth:`AnalysisSettings.replace`).
    """
    t0 = time.monotonic()
    settings = (settings or AnalysisSettings()).replace(**overrides) if overrides else (settings or AnalysisSettings())
    rd = settings.read
    task_ids = None if rd.task_ids is None else list(rd.task_ids)
    source = src.make_source(data, task_ids=task_ids, allow_pickle=rd.allow_pickle, skip_damaged=rd.skip_damaged)
    episodes = _episodes(source)
    if not episodes:
        raise ValueError(f"{source.root}: no complete episode to analyse")
    streams, missing, notes, denoise = _discover(source, episodes)
    emb, why = resolve_embedding(source, embedding) if "text_only" in streams else (None, None)
    if why:
        for m in R.TEXT_DECODING_METRICS:
            missing[f"text_only.{m}"] = why
    # The metrics see the run (settings, episodes, where they note what is missing), never the result: they return
    # values, and the result is assembled here from what they returned.
    run = R.RunContext(source, settings, episodes, denoise or {}, missing)
    say = progress or (lambda msg: logger.info(msg))
    step_values, probes, floors = _analyze_streams(run, streams, emb, say, t0)
    actions = _action_divergence(run)
    res = CollectionAnalysis(
        _source_info(source, episodes, emb, denoise), episodes, streams, run.missing, step_values, probes,
        run.attention, actions, settings, notes=notes, cf_text_positions=run.cf_text_positions, shared=run.shared,
        precision_floor=floors,
    )  # fmt: skip
    res.denoise_sensitivity = DS.analyze_denoise_sensitivity(source, res)  # expert 1 per denoising step
    for variant, out in res.denoise_sensitivity.items():
        if out.reason is not None:
            res.missing[f"expert_1.{DS.METRIC}.{variant}"] = out.reason
    if settings.pooled.pooled:
        pooled_metrics = [m for m in R.REGISTRY if m.scope == "pooled"]
        res.pooled, res.pooled_info = P.analyze_pooled(run, streams, emb, pooled_metrics, say)
    if control is not None:
        res.control = analyze_collection(
            control, settings, embedding=None if embedding is None else control_embedding, progress=progress
        )
        res.control_label = control_label or str(RunManifest.of(res.control.source["manifest"]).checkpoint or "control")
    res.timings["total_s"] = time.monotonic() - t0
    return res


def _analyze_streams(run: R.RunContext, streams: dict[str, S.Stream], emb, say: Callable[[str], None], t0: float):
    """(step_values, probes, precision floors): every registered per-step metric and the task probe, stream by stream,
    layer by layer, and the bf16 precision floor of each layer's drift states (bf16 stores only)."""
    step_values: dict[tuple[str, str], list[np.ndarray]] = {}
    floors: dict[str, list] = {}
    probes: dict[str, list[M.ProbeResult]] = {}
    probe = run.settings.probe.probe
    n_tasks = len({e.task_id for e in run.episodes})
    for name, stream in streams.items():
        for j in range(stream.n_layers):
            feats = _analyze_layer(run, stream, j, emb, step_values, floors)
            if probe and feats is not None:
                probes.setdefault(name, []).append(_probe(run.settings, feats, n_tasks))
            say(f"{name} layer {stream.layers[j]}: done ({time.monotonic() - t0:.1f}s)")
        if not stream.has_cf and stream.key is not None:
            run.missing[f"{name}.prompt_sensitivity"] = (
                "no counterfactual reruns in this collection (collect with --counterfactual blank|other-task)"
            )
    if probe and n_tasks < 2:
        run.missing["probe"] = f"the task probe needs two tasks or more; this collection has {n_tasks}"
    return step_values, probes, floors


def _run(metrics: list[R.Metric], block: R.LayerBlock, step_values: dict) -> None:
    """Each metric's (rows, values) of the block into its [rollout steps, layers] array of the episode."""
    for metric in metrics:
        out = metric.compute(block)
        if out is None:
            continue
        key = (block.stream.name, metric.name)
        if key not in step_values:
            n_layers = block.stream.n_layers
            step_values[key] = [np.full((e.n_steps, n_layers), np.nan) for e in block.run.episodes]
        step_values[key][block.ep_index][out[0], block.layer] = out[1]


class _ProbeRows:
    """The task probe's features of one layer, gathered block by block."""

    def __init__(self):
        self.feats, self.labels, self.groups, self.cams = [], [], [], []

    def add(self, stream: S.Stream, block: R.LayerBlock, cam: np.ndarray | None) -> None:
        text_mask = block.mask if stream.name == "text_only" else None
        if text_mask is not None and not block.run.settings.text.include_constant_tokens:
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


def _analyze_layer(
    run: R.RunContext, stream: S.Stream, j: int, emb: TokenEmbedding | None, step_values: dict, floors: dict
):
    """Every registered metric of one layer of one stream over every episode; returns the probe features."""
    block_metrics = [m for m in R.REGISTRY if m.scope == "block" and R.applies(m, stream, emb)]
    episode_metrics = [m for m in R.REGISTRY if m.scope == "episode" and R.applies(m, stream, emb)]
    probe = _ProbeRows()
    source = run.source
    mean = _layer_mean(run, stream, j) if any(m.needs_layer_mean for m in block_metrics) else None
    for ep_i, ep in enumerate(run.episodes):
        if ep.n_steps == 0:  # env.reset failed: no rollout step (its rows stay empty / NaN)
            continue
        fields = source.fields(ep.task_id, ep.episode)
        common = dict(source=source, run=run, stream=stream, ep_index=ep_i, episode=ep, layer=j, fields=fields)
        if stream.key is not None and stream.key in fields:
            shape, dims = fields[stream.key]
            per_step = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float32)  # read as float32
            carry: dict[str, Any] = {}
            for steps in _blocks(ep.n_steps, per_step, run.settings.read.max_block_bytes):
                block = R.LayerBlock(**common, steps=steps, embedding=emb, carry=carry, layer_mean=mean)
                cam = _read_block(block, "segment_mask" in fields)
                if len(floors.get(stream.name, ())) == j and _stored_bf16(run):  # first block only
                    x = SM.drift_states(stream, block.x)
                    floors.setdefault(stream.name, []).append(_precision_floor(x, block.mask, run.settings.stats.seed))
                _run(block_metrics, block, step_values)
                probe.add(stream, block, cam)
        _run(episode_metrics, R.LayerBlock(**common, steps=None, embedding=emb), step_values)
    return probe.result(stream)


def _precision_floor(x: np.ndarray, mask: np.ndarray | None, seed: int, max_rows: int = 2048) -> dict[str, float]:
    """The bf16 floor from at most ``max_rows`` valid positions of a block [..., W], gathered by index: a copy of the
    whole block (``x[mask]``) would raise the analysis's peak memory by a block per layer."""
    lead = x.shape[:-1]
    idx = np.flatnonzero(np.ones(lead, bool) if mask is None else np.broadcast_to(mask, lead))
    if len(idx) > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_rows, replace=False))
    return PF.floors(x[np.unravel_index(idx, lead)], seed=seed, max_rows=max_rows)


def _stored_bf16(run: R.RunContext) -> bool:
    """Hidden states stored in bfloat16 (the capture's default) rather than float32 / float16."""
    return RunManifest.of(run.source.manifest).capture("dtype", "bfloat16") == "bfloat16"


def _layer_mean(run: R.RunContext, stream: S.Stream, j: int) -> np.ndarray | None:
    """[W] float64 mean of the layer's drift states over every valid position, rollout step and episode (a first
    pass over the layer: centred drift needs the centre before its first block)."""
    source, total, count = run.source, None, 0
    for ep_i, ep in enumerate(run.episodes):
        fields = source.fields(ep.task_id, ep.episode)
        if ep.n_steps == 0 or stream.key is None or stream.key not in fields:
            continue
        common = dict(source=source, run=run, stream=stream, ep_index=ep_i, episode=ep, layer=j, fields=fields)
        shape, dims = fields[stream.key]
        per_step = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float32)
        for steps in _blocks(ep.n_steps, per_step, run.settings.read.max_block_bytes):
            block = R.LayerBlock(**common, steps=steps)
            _read_block(block, "segment_mask" in fields)
            x = SM.drift_states(stream, block.x).astype(np.float64)
            valid = np.ones(x.shape[:-1], bool) if block.mask is None else np.broadcast_to(block.mask, x.shape[:-1])
            part = x[valid].sum(0)
            total = part if total is None else total + part
            count += int(valid.sum())
    return None if not count else total / count


def _probe(s: AnalysisSettings, feats, n_tasks: int) -> M.ProbeResult:
    x, y, g = feats
    return M.task_probe(
        x,
        y,
        g,
        n_splits=s.probe.probe_splits,
        n_shuffles=s.probe.probe_shuffles if n_tasks > 1 else 0,
        seed=s.stats.seed,
        n_permutations=s.stats.n_permutations if n_tasks > 1 else 0,
    )


def _action_divergence(run: R.RunContext) -> dict[str, list[np.ndarray]]:
    """Per episode [steps] action-chunk divergence under the counterfactual prompt (mean L2, max abs)."""
    source = run.source
    actions: dict[str, list[np.ndarray]] = {"mean_l2": [], "max_abs": []}
    cf_actions = schema.counterfactual("actions")
    for ep in run.episodes:
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
        actions["mean_l2"].append(l2)
        actions["max_abs"].append(mx)
    if not any(np.any(~np.isnan(v)) for v in actions["mean_l2"]):
        run.missing["action_divergence"] = "no counterfactual reruns (cf_actions) in this collection"
    return actions
