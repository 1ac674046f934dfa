"""Language-loss analysis of a collection (design.md section 6), streamed one layer at a time.

:func:`analyze_collection` walks streams → layers → episodes → blocks of rollout steps and reads, per block, one
layer of one stream (``read(task, episode, key, layer=l, steps=block)``), so memory is bounded by a block of one
layer (``max_block_bytes``), never a whole episode. Every number comes from :mod:`openpi.latents.metrics` /
:mod:`openpi.latents.stats`; this module only feeds them and keeps the small per-step results:

* ``step_values[(stream, metric)]``: one float array [rollout steps, layers] per episode (NaN where undefined).
  Metrics: ``text_accuracy``, ``language_loss`` (= 1 − accuracy), ``logit_nll``, ``logit_rank``, ``logit_top1``
  (text_only only), ``prompt_sensitivity`` (steps with a counterfactual rerun), ``drift`` (vs rollout step 0),
  ``attention_to_text`` (expert_1: mean mass on the valid text keys over denoising steps, heads and queries).
* ``probes[stream]``: one :class:`ProbeResult` per layer (task id from the stream's pooled features, folds grouped
  by episode, chance and shuffled control).
* ``attention``: [S, L] means over all rollout steps (all queries / state query / action queries), for the heatmap;
  ``attention["denoise_steps"]`` the denoising-step id of each row (from the manifest's capture_spec).
* ``actions``: per episode [steps] action-chunk divergence (mean L2 over the chunk) under the counterfactual prompt.

expert_0 counts valid cameras only (``segment_mask``, or the preset's masks for older stores; see
:mod:`openpi.latents.analysis_source`): a masked camera's image positions are left out of prompt sensitivity and
drift, and its block out of the probe features. expert_1 drift is taken at the last captured denoising step (see
``METRICS["drift"]``).

Episodes with no rollout step (env.reset failed: stored with an error and no steps) get empty rows and are skipped;
streams are discovered from the first episode with steps; both are reported (``source["episodes_without_steps"]``).

Summaries over episodes (:meth:`CollectionAnalysis.per_layer`, :meth:`heatmap`, :meth:`success_split`) treat the
episode as the unit: a metric is first averaged over an episode's rollout steps (``drift`` without step 0, which is
0 by definition), then bootstrapped over episodes. The success split (:meth:`success_split`) leaves out episodes that
ended with an error and, by default (``success_window="common"``), averages every episode over the same window: the
first N rollout steps, N = the fewest steps of any episode in the split. Failed episodes run to max_steps while
successful ones stop early, and per-step metrics such as drift grow with t, so whole-episode means would differ by
episode length alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from openpi.latents import analysis_source as src
from openpi.latents import metrics as M
from openpi.latents import schema
from openpi.latents.checkpoint_leaves import TokenEmbedding, token_embedding_for_manifest

logger = logging.getLogger(__name__)

# metric -> (streams it applies to, one-line definition). Reasons for the others are in NOT_APPLICABLE.
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "language_loss": (
        ("text_only",),
        "1 − text reconstruction accuracy: fraction of valid prompt positions whose state's nearest token embedding "
        "(cosine) is not the prompt token",
    ),
    "text_accuracy": (
        ("text_only",),
        "text reconstruction accuracy (nearest token embedding by cosine equals the prompt token)",
    ),
    "logit_nll": (("text_only",), "same-position logit lens: −log softmax(E·RMSNorm_final(h))[token], nats"),
    "logit_rank": (
        ("text_only",),
        "same-position logit lens: rank of the prompt token among all vocab logits (0 = top)",
    ),
    "logit_top1": (
        ("text_only",),
        "same-position logit lens: fraction of positions where the prompt token has the top logit",
    ),
    "prompt_sensitivity": (
        src.STREAMS,
        "‖a − b‖/‖a‖ between the stream under the prompt (a) and the counterfactual prompt (b), same observation and "
        "noise (expert_0: image positions of valid cameras only; text_only: over the positions that hold the same "
        "token under both prompts, which with a blank counterfactual is BOS alone: a one-position measure)",
    ),
    "drift": (
        src.STREAMS,
        "1 − cos(x_t, x_0) to the first rollout step of the same episode (expert_0: valid cameras only; expert_1: at "
        "the last captured denoising step, the one closest to the action: openpi draws fresh noise at every "
        "inference, so early denoising steps drift by the noise alone)",
    ),
    "attention_to_text": (
        ("expert_1",),
        "attention mass of expert-1 queries on the valid text keys, mean over denoising steps, heads and queries",
    ),
}
NOT_APPLICABLE = {
    "expert_0": "expert 0's image positions hold no prompt token to decode; text decoding applies to its text "
    "positions (text_only)",
    "expert_1": "expert 1 reads no text tokens (state + action tokens): there is no token identity to decode",
    "attention": "attention_to_text is captured for expert-1 queries only (they attend to expert 0's text keys)",
}


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    task_id: int
    episode: int
    success: bool
    n_steps: int
    step_t: tuple[int, ...]
    prompt: str | None
    counterfactual_prompt: str | None
    error: str | None


@dataclasses.dataclass
class CollectionAnalysis:
    """Everything :func:`analyze_collection` computed (see the module docstring); summaries are methods."""

    source: dict[str, Any]
    episodes: list[EpisodeRef]
    streams: dict[str, src.Stream]
    missing: dict[str, str]
    step_values: dict[tuple[str, str], list[np.ndarray]]
    probes: dict[str, list[M.ProbeResult]]
    attention: dict[str, np.ndarray]
    actions: dict[str, list[np.ndarray]]
    settings: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # {what: note}: how layer / denoising-step ids and camera validity were resolved when not read off the manifest
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    # text_only counterfactual reruns: positions compared per rerun (same token under both prompts)
    cf_text_positions: list[int] = dataclasses.field(default_factory=list)

    def has(self, stream: str, metric: str) -> bool:
        return (stream, metric) in self.step_values

    def layers(self, stream: str) -> list[int]:
        return list(self.streams[stream].layers)

    def reason(self, stream: str, metric: str) -> str | None:
        """Why ``metric`` has no values for ``stream`` (None when it has)."""
        if self.has(stream, metric):
            return None
        if stream not in METRICS[metric][0]:
            return NOT_APPLICABLE["attention" if metric == "attention_to_text" else stream]
        if stream not in self.streams:
            return self.missing.get(stream, "stream not captured")
        return self.missing.get(f"{stream}.{metric}", "not computed")

    def per_episode(self, stream: str, metric: str, n_steps: int | None = None) -> np.ndarray:
        """[episodes, layers]: each episode's mean over its rollout steps, or over its first ``n_steps`` only (drift:
        without step 0, which is 0 by definition; NaN for an episode without a value)."""
        out = []
        for v in self.step_values[(stream, metric)]:
            v = v if n_steps is None else v[:n_steps]
            v = v[1:] if metric == "drift" else v
            with quiet_nan_warnings():
                out.append(np.nanmean(v, axis=0) if len(v) else np.full(v.shape[1], np.nan))
        return np.asarray(out)

    def per_layer(self, stream: str, metric: str, *, n_boot: int | None = None) -> list[M.BootstrapCI]:
        """Per layer: mean over episodes of :meth:`per_episode`, with a bootstrap interval over episodes."""
        pe = self.per_episode(stream, metric)
        nb = self.settings["n_boot"] if n_boot is None else n_boot
        return [M.bootstrap_ci(pe[:, j], n_boot=nb, seed=self.settings["seed"]) for j in range(pe.shape[1])]

    def heatmap(self, stream: str, metric: str) -> np.ndarray:
        """[layers, rollout-step index]: mean over the episodes that reached that step (NaN where none)."""
        vals = self.step_values[(stream, metric)]
        n = max(len(v) for v in vals)
        grid = np.full((len(vals), n, vals[0].shape[1]), np.nan)
        for i, v in enumerate(vals):
            grid[i, : len(v)] = v
        with quiet_nan_warnings():
            return np.nanmean(grid, axis=0).T

    def split_mask(self) -> np.ndarray:
        """[episodes] bool: the episodes of the success split (no error, at least one rollout step)."""
        return np.array([e.error is None and e.n_steps > 0 for e in self.episodes], bool)

    def split_counts(self) -> tuple[int, int]:
        """(successful, failed) episodes in the success split."""
        keep = self.split_mask()
        n_s = sum(e.success for e, k in zip(self.episodes, keep) if k)
        return n_s, int(keep.sum()) - n_s

    def split_window(self, window: str | None = None) -> int | None:
        """Rollout steps each episode is averaged over in the success split: None (all its steps) for
        ``window="all"``; for "common" (the default setting) the fewest steps of any episode in the split."""
        window = window or self.settings.get("success_window", "common")
        if window not in ("common", "all"):
            raise ValueError(f"success window must be 'common' or 'all', got {window!r}")
        if window == "all":
            return None
        n = [e.n_steps for e, k in zip(self.episodes, self.split_mask()) if k]
        return min(n) if n else None

    def split_info(self, window: str | None = None) -> dict[str, Any]:
        """What the success split compares: window, steps, episodes left out (errors) and the counts per side."""
        window = window or self.settings.get("success_window", "common")
        n_s, n_f = self.split_counts()
        errored = [e for e in self.episodes if e.error is not None]
        return {
            "window": window,
            "n_inferences": self.split_window(window),
            "n_success": n_s,
            "n_failure": n_f,
            "excluded_errored": [
                {"task_id": e.task_id, "episode": e.episode, "n_steps": e.n_steps, "error": e.error} for e in errored
            ],
        }

    def success_split(self, stream: str, metric: str, window: str | None = None) -> list[M.SuccessSplit]:
        """Per layer: successful vs failed episodes (errored episodes left out), each averaged over the window of
        :meth:`split_window` (default: the rollout steps every episode of the split has)."""
        pe = self.per_episode(stream, metric, n_steps=self.split_window(window))
        keep = self.split_mask()
        flags = np.array([e.success for e in self.episodes])[keep]
        s = self.settings
        return [M.split_by_success(pe[keep, j], flags, n_boot=s["n_boot"], seed=s["seed"]) for j in range(pe.shape[1])]

    def action_divergence_per_episode(self, n_steps: int | None = None) -> np.ndarray:
        """[episodes] mean over the reruns (among the first ``n_steps`` rollout steps) of the action divergence."""
        with quiet_nan_warnings():
            return np.array(
                [np.nanmean(v[:n_steps]) if np.any(~np.isnan(v[:n_steps])) else np.nan for v in self.actions["mean_l2"]]
            )


@contextlib.contextmanager
def quiet_nan_warnings():
    """Silences numpy's RuntimeWarnings (mean of empty slice, ...): NaN already says "undefined" in the results."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


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
                    meta.get("error"),
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
    success_window: str = "common",
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    skip_damaged: bool = False,
) -> CollectionAnalysis:
    """Computes every section-6 metric per stream and layer for a collection (store path, task data, ...).

    Args:
        data: a store directory, a pickle path (with ``allow_pickle``), a ``LatentStore``, task data or ``{id: task}``.
        embedding: the :class:`TokenEmbedding` for text decoding; "auto" reads it from the manifest's checkpoint;
            None skips text decoding (reported with the reason).
        probe: run the task probe (needs two tasks or more); ``probe_splits`` folds, ``probe_shuffles`` permutations.
        n_boot, seed: bootstrap resamples and seed for every interval.
        text_step_stride: decode text at every k-th rollout step only (text decoding dominates the cost at full size).
        max_block_bytes: rollout steps of one layer read per block (bounds memory).
        success_window: "common" (default): the success split averages every episode over the first N rollout steps,
            N = the fewest any episode of the split has; "all": over each episode's own steps (length-confounded).
        skip_damaged: a store path with damaged episodes is refused (listing them) unless this skips them.
    """
    t0 = time.monotonic()
    if success_window not in ("common", "all"):
        raise ValueError(f"success_window must be 'common' or 'all', got {success_window!r}")
    source = src.make_source(data, task_ids=task_ids, allow_pickle=allow_pickle, skip_damaged=skip_damaged)
    episodes = _episodes(source)
    if not episodes:
        raise ValueError(f"{source.root}: no complete episode to analyse")
    no_steps = [e for e in episodes if e.n_steps == 0]
    first = next((e for e in episodes if e.n_steps > 0), None)
    if first is None:
        why = f"no episode has a rollout step (all {len(episodes)} ended before their first inference)"
        streams, missing = {}, dict.fromkeys(src.STREAMS, why)
    else:
        streams, missing = src.discover_streams(source.fields(first.task_id, first.episode), source.manifest)
    notes: dict[str, str] = {}
    for name, stream in streams.items():
        if stream.layer_note:
            notes[f"{name}.layers"] = stream.layer_note
        if stream.segment_note:
            notes[f"{name}.cameras"] = stream.segment_note
    denoise: dict[str, Any] = {}
    if "expert_1" in streams and first is not None:
        e1 = streams["expert_1"]
        n_s = source.fields(first.task_id, first.episode)[e1.key or "attention_to_text"][0][0]
        ids, kind, note = src.resolve_denoise_steps(source.manifest, n_s)
        denoise = {"ids": list(ids), "kind": kind}
        if note:
            notes["expert_1.denoise_steps"] = note
    emb, why = resolve_embedding(source, embedding) if "text_only" in streams else (None, None)
    if why:
        for m in ("language_loss", "text_accuracy", "logit_nll", "logit_rank", "logit_top1"):
            missing[f"text_only.{m}"] = why
    n_tasks = len({e.task_id for e in episodes})
    res = CollectionAnalysis(
        source={
            "root": source.root,
            "manifest": source.manifest,
            "n_tasks": n_tasks,
            "n_episodes": len(episodes),
            "embedding": None if emb is None else emb.source,
            "episodes_without_steps": [
                {"task_id": e.task_id, "episode": e.episode, "error": e.error} for e in no_steps
            ],
            "n_errored": sum(e.error is not None for e in episodes),
            "denoise_steps": denoise or None,
        },
        episodes=episodes,
        streams=streams,
        missing=missing,
        step_values={},
        probes={},
        attention={},
        actions={},
        settings=dict(
            n_boot=n_boot,
            seed=seed,
            probe_splits=probe_splits,
            probe_shuffles=probe_shuffles,
            text_step_stride=text_step_stride,
            max_block_bytes=max_block_bytes,
            success_window=success_window,
        ),
        notes=notes,
    )
    say = progress or (lambda msg: logger.info(msg))
    for name, stream in streams.items():
        for j in range(stream.n_layers):
            feats = _analyze_layer(source, res, stream, j, emb)
            if probe and feats is not None:
                res.probes.setdefault(name, []).append(_probe(res, feats, n_tasks))
            say(f"{name} layer {stream.layers[j]}: done ({time.monotonic() - t0:.1f}s)")
        if not stream.has_cf and stream.key is not None:
            missing[f"{name}.prompt_sensitivity"] = (
                "no counterfactual reruns in this collection (collect with --counterfactual blank|other-task)"
            )
    if probe and n_tasks < 2:
        missing["probe"] = f"the task probe needs two tasks or more; this collection has {n_tasks}"
    _action_divergence(source, res)
    res.timings["total_s"] = time.monotonic() - t0
    return res


def _put(res: CollectionAnalysis, stream: src.Stream, metric: str, ep_i: int, rows, j: int, values) -> None:
    lst = res.step_values.setdefault(
        (stream.name, metric), [np.full((e.n_steps, stream.n_layers), np.nan) for e in res.episodes]
    )
    lst[ep_i][rows, j] = values


def _analyze_layer(source, res: CollectionAnalysis, stream: src.Stream, j: int, emb: TokenEmbedding | None):
    """All per-step metrics of one layer of one stream over every episode; returns the probe features."""
    feats, labels, groups, cams = [], [], [], []
    is_text = stream.name == "text_only"
    is_e0 = stream.name == "expert_0"
    stride = res.settings["text_step_stride"]
    for ep_i, ep in enumerate(res.episodes):
        if ep.n_steps == 0:  # env.reset failed: no rollout step (its rows stay empty / NaN)
            continue
        t, k = ep.task_id, ep.episode
        fields = source.fields(t, k)
        if stream.key is not None and stream.key in fields:
            shape, dims = fields[stream.key]
            per_step = schema.nbytes([s for d, s in zip(dims, shape) if d != "layer"], np.float32)  # read as float32
            cf_steps = set(source.present_steps(t, k, stream.cf_key)) if stream.has_cf else set()
            seg_stored = is_e0 and "segment_mask" in fields
            cf_seg = is_e0 and schema.counterfactual("segment_mask") in fields
            x0 = m0 = None
            for block in _blocks(ep.n_steps, per_step, res.settings["max_block_bytes"]):
                x = src.states(stream, source.read(t, k, stream.key, layer=j, steps=block))
                mask = source.read(t, k, "text_mask", steps=block).astype(bool) if is_text else None
                cam = None
                if is_e0:  # valid cameras only: a masked camera's states are meaningless
                    seg = source.read(t, k, "segment_mask", steps=block) if seg_stored else None
                    cam = src.camera_valid(stream, seg, x.shape[:2])
                    mask = src.position_mask(stream, cam)
                    if cam is not None:
                        cams.append(cam.reshape(-1, stream.n_cams))
                # expert_1: drift at the last captured denoising step (earlier ones drift by the fresh noise alone)
                xd = x[:, -1] if stream.name == "expert_1" else x
                if x0 is None:
                    x0, m0 = xd[:1], None if mask is None else mask[:1]
                both = np.concatenate([x0, xd])
                bm = None if mask is None else np.concatenate([m0, mask])
                _put(res, stream, "drift", ep_i, block, j, M.rollout_drift(both, mask=bm)[1:])
                feats.append(src.probe_features(stream, x, mask if is_text else None, cam))
                labels += [t] * len(feats[-1])
                groups += [ep_i] * len(feats[-1])
                sel = [i for i, s in enumerate(block) if s in cf_steps]
                if sel:
                    steps = [block[i] for i in sel]
                    b = src.states(stream, source.read(t, k, stream.cf_key, layer=j, steps=steps))
                    cm = None if mask is None else mask[sel]
                    if is_text:  # positions valid under both prompts that hold the same token
                        same = source.read(t, k, "tokenized_prompt", steps=steps) == source.read(
                            t, k, schema.counterfactual("tokenized_prompt"), steps=steps
                        )
                        cm = cm & source.read(t, k, schema.counterfactual("text_mask"), steps=steps).astype(bool) & same
                        if j == 0:
                            res.cf_text_positions += [int(c) for c in cm.reshape(len(steps), -1).sum(-1)]
                    elif cf_seg and cm is not None:  # cameras valid in both runs
                        cf_cam = src.camera_valid(
                            stream, source.read(t, k, schema.counterfactual("segment_mask"), steps=steps), b.shape[:2]
                        )
                        cm = cm & src.position_mask(stream, cf_cam)
                    _put(
                        res,
                        stream,
                        "prompt_sensitivity",
                        ep_i,
                        steps,
                        j,
                        M.prompt_sensitivity(x[sel], b, mask=cm, keep_axes=0),
                    )
                if is_text and emb is not None:
                    dec = [i for i, s in enumerate(block) if s % stride == 0]
                    if dec:
                        ids = source.read(t, k, "tokenized_prompt", steps=[block[i] for i in dec])
                        rows = [block[i] for i in dec]
                        xs, ms = x[dec], mask[dec]
                        tr = M.text_reconstruction(xs, ids, ms, emb.embedding, keep_axes=0)
                        ll = M.logit_lens(xs, ids, ms, emb.embedding, emb.final_norm_scale, keep_axes=0)
                        _put(res, stream, "text_accuracy", ep_i, rows, j, tr.accuracy)
                        _put(res, stream, "language_loss", ep_i, rows, j, tr.language_loss)
                        _put(res, stream, "logit_nll", ep_i, rows, j, ll.mean_nll)
                        _put(res, stream, "logit_rank", ep_i, rows, j, ll.mean_rank)
                        _put(res, stream, "logit_top1", ep_i, rows, j, ll.top1)
        if stream.attention and "attention_to_text" in fields:
            _attention(source, res, stream, ep_i, j)
    if not feats:
        return None
    x = src.drop_invalid_cameras(stream, np.concatenate(feats), np.concatenate(cams) if cams else None)
    return x, np.asarray(labels), np.asarray(groups)


def _attention(source, res: CollectionAnalysis, stream: src.Stream, ep_i: int, j: int) -> None:
    ep = res.episodes[ep_i]
    a = source.read(ep.task_id, ep.episode, "attention_to_text", layer=j)  # [steps, S, B, heads, Ts]
    per_step = []
    for i in range(len(a)):
        summary = M.attention_to_language(a[i][:, None])  # [S, 1, B, heads, Ts]
        per_step.append(summary.overall)
        for name, value in (
            ("all", summary.per_step_layer),
            ("state", summary.state_token),
            ("actions", summary.action_tokens),
        ):
            acc = res.attention.setdefault(name, np.zeros((a.shape[1], stream.n_layers)))
            acc[:, j] += value[:, 0]
        cnt = res.attention.setdefault("count", np.zeros((a.shape[1], stream.n_layers)))
        cnt[:, j] += 1
    _put(res, stream, "attention_to_text", ep_i, slice(None), j, np.asarray(per_step))
    if "denoise_times" not in res.attention:
        res.attention["denoise_times"] = np.asarray(source.read(ep.task_id, ep.episode, "denoise_times", steps=[0])[0])
        ids = (res.source.get("denoise_steps") or {}).get("ids")
        res.attention["denoise_steps"] = np.asarray(ids if ids and len(ids) == a.shape[1] else range(a.shape[1]))


def _probe(res: CollectionAnalysis, feats, n_tasks: int) -> M.ProbeResult:
    x, y, g = feats
    s = res.settings
    return M.task_probe(
        x, y, g, n_splits=s["probe_splits"], n_shuffles=s["probe_shuffles"] if n_tasks > 1 else 0, seed=s["seed"]
    )


def _action_divergence(source, res: CollectionAnalysis) -> None:
    res.actions = {"mean_l2": [], "max_abs": []}
    for ep in res.episodes:
        l2, mx = np.full(ep.n_steps, np.nan), np.full(ep.n_steps, np.nan)
        fields = source.fields(ep.task_id, ep.episode)
        if schema.counterfactual("actions") in fields and "actions" in fields:
            steps = source.present_steps(ep.task_id, ep.episode, schema.counterfactual("actions"))
            if steps:
                d = M.action_divergence(
                    source.read(ep.task_id, ep.episode, "actions", steps=steps),
                    source.read(ep.task_id, ep.episode, schema.counterfactual("actions"), steps=steps),
                )
                l2[steps], mx[steps] = d.mean_l2, d.max_abs
        res.actions["mean_l2"].append(l2)
        res.actions["max_abs"].append(mx)
    if not any(np.any(~np.isnan(v)) for v in res.actions["mean_l2"]):
        res.missing["action_divergence"] = "no counterfactual reruns (cf_actions) in this collection"


def attention_means(res: CollectionAnalysis) -> dict[str, np.ndarray]:
    """[S, L] mean attention mass (all queries / state query / action queries) over every rollout step."""
    if "count" not in res.attention:
        return {}
    cnt = res.attention["count"]
    with np.errstate(all="ignore"):
        return {k: res.attention[k] / cnt for k in ("all", "state", "actions")}


def summary_value(res: CollectionAnalysis, stream: str, metric: str) -> Mapping[str, Any]:
    """JSON-ready per-layer summary of one (stream, metric): values, CIs, n, or None with the reason."""
    if not res.has(stream, metric):
        return {"per_layer": None, "reason": res.reason(stream, metric)}
    cis = res.per_layer(stream, metric)
    return {
        "layers": res.layers(stream),
        "per_layer": [c.estimate for c in cis],
        "ci_low": [c.low for c in cis],
        "ci_high": [c.high for c in cis],
        "n_episodes": [c.n for c in cis],
    }
