"""Pooled (collection-level) metrics: the ones that need many episodes at once — held-out probes, the tuned lens, CKA,
effective rank — computed per stream and layer on a fixed sample of rollout steps.

The sample (:func:`sample_steps`): ``steps_per_episode`` rollout steps of every episode with steps, evenly spaced over
the episode (the same steps for every stream and layer, so rows line up across layers for CKA). Each stream's states
at those steps become rows (:class:`PooledLayer`):

* ``text_only``: one row per content position (``text_mask`` without its first valid position, BOS, and its last, the
  trailing ``"\\n"``), with its token id, task, episode and prompt slot (task, position).
* ``expert_0``: one row per valid camera of each sampled inference (the camera's pooled state: the stored mean
  of a pooled capture, the mean of its tokens of a full one).
* ``expert_1``: one row per suffix token (pooled: state token, mean of the action tokens) at the last captured
  denoising step; ``per_step`` holds the suffix tokens 1: at every captured step (token 0 is pi0's state token, the same
  at every step by construction).
* ``per_inference``: one row per sampled inference, the task probe's features (``streams.probe_features``), which
  line up across streams (expert-to-expert CKA).

Every pooled metric is a :class:`openpi.latents.analysis.metrics.registry.Metric` with ``scope="pooled"``: its compute
takes one :class:`PooledLayer` and returns a :class:`PooledValue` (one number per layer, plus named extras such as
the control task's accuracy or a CKA matrix row). Rows over ``max_rows`` are subsampled (fixed seed, the same rows
for every layer); CKA uses at most ``cka_rows`` of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from openpi.latents.analysis.data import streams as S

if TYPE_CHECKING:
    from openpi.latents.analysis.data.embedding import TokenEmbedding
    from openpi.latents.analysis.run.result import CollectionAnalysis

FINAL_KEY = "text_only_final_norm"


@dataclasses.dataclass(frozen=True)
class PooledValue:
    """One pooled metric at one layer: ``value`` (NaN with ``reason`` when not computable) and named ``extra``
    numbers or arrays (a control's value, a CKA matrix row, sizes)."""

    value: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None


@dataclasses.dataclass
class PooledLayer:
    """What a pooled metric sees: one stored layer of one stream at the sampled rollout steps, as rows."""

    res: CollectionAnalysis
    stream: S.Stream
    layer: int
    x: np.ndarray  # [N, W] float32 rows (see the module docstring)
    task: np.ndarray  # [N] task id of each row
    episode: np.ndarray  # [N] index into res.episodes
    per_inference: np.ndarray  # [n_inf, d] one row per sampled inference
    token: np.ndarray | None = None  # text_only: [N] token id
    slot: np.ndarray | None = None  # text_only: [N] prompt slot id (task, position)
    per_step: np.ndarray | None = None  # expert_1: [S, N1, W] suffix tokens 1: at each captured denoising step
    final: np.ndarray | None = None  # text_only: [N, W] the tuned lens's target rows (see ``final_normed``)
    final_normed: bool = False  # final holds expert 0's output after its final norm (else the last stored layer)
    embedding: TokenEmbedding | None = None
    carry: dict[str, Any] = dataclasses.field(default_factory=dict)  # across the layers of one stream
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # across streams (per-inference grams)

    @property
    def settings(self) -> dict[str, Any]:
        return self.res.settings

    def groups(self) -> np.ndarray:
        """The held-out unit of each row: the task (default) or the episode (``pooled_split``)."""
        return self.task if self.settings.get("pooled_split", "task") == "task" else self.episode


def sample_steps(res: CollectionAnalysis, per_episode: int) -> dict[int, list[int]]:
    """{episode index: rollout steps}: ``per_episode`` evenly spaced steps of every episode with steps."""
    out = {}
    for i, ep in enumerate(res.episodes):
        if ep.n_steps:
            out[i] = sorted(
                set(np.rint(np.linspace(0, ep.n_steps - 1, min(per_episode, ep.n_steps))).astype(int).tolist())
            )
    return out


def _content_mask(text_mask: np.ndarray) -> np.ndarray:
    """``text_mask`` without the first and the last valid position of each row (BOS and the trailing newline)."""
    m = text_mask.astype(bool).copy()
    n = m.shape[-1]
    idx = np.arange(n)
    first = np.where(m.any(-1), np.argmax(m, -1), n)
    last = np.where(m.any(-1), n - 1 - np.argmax(m[..., ::-1], -1), -1)
    return m & (idx != first[..., None]) & (idx != last[..., None])


def _episode_rows(source, res, stream: S.Stream, j: int, ep_i: int, steps: list[int]) -> dict[str, np.ndarray]:
    """The rows of one episode at ``steps`` of stored layer ``j`` (see the module docstring)."""
    ep = res.episodes[ep_i]

    def read(key, layer=None):
        return source.read(ep.task_id, ep.episode, key, layer=layer, steps=steps)

    x = S.states(stream, read(stream.key, j))
    out: dict[str, np.ndarray] = {}
    if stream.name == "text_only":
        tm = read("text_mask").astype(bool)
        cm = _content_mask(tm)
        out["x"] = x[cm].astype(np.float32)
        out["token"] = read("tokenized_prompt")[cm].astype(np.int64)
        out["slot"] = np.nonzero(cm)[-1].astype(np.int64)  # position; the task is added by the caller
        out["inf"] = S.probe_features(stream, x, tm)
        return out | {"n": np.asarray(cm.sum())}
    if stream.name == "expert_0":
        fields = source.fields(ep.task_id, ep.episode)
        cam = S.camera_valid(stream, read("segment_mask") if "segment_mask" in fields else None, x.shape[:2])
        feats = S.probe_features(stream, x, None, cam)  # [steps·B, n_cams·W], invalid cameras zeroed
        rows = feats.reshape(len(feats), stream.n_cams, -1)
        valid = np.ones(rows.shape[:2], bool) if cam is None else cam.reshape(-1, stream.n_cams)
        return {"x": rows[valid], "inf": feats, "n": np.asarray(valid.sum())}
    xf = x.astype(np.float32)  # expert_1: [steps, S, B, tokens, W]
    w = xf.shape[-1]
    return {
        "x": xf[:, -1].reshape(-1, w),
        "per_step": np.moveaxis(xf[..., 1:, :], 1, 0).reshape(xf.shape[1], -1, w),
        "inf": S.probe_features(stream, x),
        "n": np.asarray(xf[:, -1].reshape(-1, w).shape[0]),
    }


def _layer_rows(source, res, stream, j, sample) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for ep_i, steps in sample.items():
        r = _episode_rows(source, res, stream, j, ep_i, steps)
        n = int(r.pop("n"))
        ep = res.episodes[ep_i]
        r["task"] = np.full(n, ep.task_id)
        r["episode"] = np.full(n, ep_i)
        if "slot" in r:
            r["slot"] = r["slot"] + 100_000 * ep.task_id
        for k, v in r.items():
            parts.setdefault(k, []).append(v)
    out = {k: np.concatenate(v, axis=1 if k == "per_step" else 0) for k, v in parts.items()}
    if stream.name == "expert_0" and "inf" in out:  # cameras valid in no row are dropped, as in the task probe
        keep = out["inf"].reshape(len(out["inf"]), stream.n_cams, -1).any(-1).any(0)
        out["inf"] = out["inf"].reshape(len(out["inf"]), stream.n_cams, -1)[:, keep].reshape(len(out["inf"]), -1)
    return out


def _subsample(rows: dict[str, np.ndarray], max_rows: int, seed: int) -> dict[str, np.ndarray]:
    n = len(rows["x"])
    if n <= max_rows:
        return rows
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])
    return {k: (v if k in ("inf", "per_step") else v[keep]) for k, v in rows.items()}


def _final_rows(source, res, stream, sample) -> tuple[np.ndarray, bool]:
    """The tuned lens's target rows: the final-norm capture if stored (True), else the last stored layer (False)."""
    ep = res.episodes[next(iter(sample))]
    if FINAL_KEY not in source.fields(ep.task_id, ep.episode):
        return _layer_rows(source, res, stream, stream.n_layers - 1, sample)["x"], False
    parts = []
    for ep_i, steps in sample.items():
        e = res.episodes[ep_i]
        f = source.read(e.task_id, e.episode, FINAL_KEY, steps=steps)
        parts.append(f[_content_mask(source.read(e.task_id, e.episode, "text_mask", steps=steps))].astype(np.float32))
    return np.concatenate(parts), True


def analyze_pooled(
    source, res: CollectionAnalysis, emb: TokenEmbedding | None, metrics, say: Callable[[str], None]
) -> None:
    """Every pooled metric of every stream and layer into ``res.pooled[(stream, metric)]`` (one value per layer)."""
    from openpi.latents.analysis.metrics.pooled import inference_gram  # (pooled_metrics imports this module)

    s = res.settings
    sample = sample_steps(res, s["pooled_steps_per_episode"])
    if not sample:
        return
    shared: dict[str, Any] = {}
    res.pooled_info = {
        "n_tasks": len({res.episodes[i].task_id for i in sample}),
        "n_episodes": len(sample),
        "n_inferences": sum(len(v) for v in sample.values()),
        "steps_per_episode": s["pooled_steps_per_episode"],
        "split": s["pooled_split"],
    }
    for name, stream in res.streams.items():
        todo = [m for m in metrics if name in m.streams and stream.key is not None]
        todo = [m for m in todo if emb is not None or not m.needs_embedding]
        if not todo:
            continue
        final, normed = None, False
        if name == "text_only" and any(m.needs_embedding for m in todo):
            final, normed = _final_rows(source, res, stream, sample)
            final = _subsample({"x": final}, s["pooled_max_rows"], s["seed"])["x"]  # the rows' subset (same n, seed)
        carry: dict[str, Any] = {}
        for j in range(stream.n_layers):
            rows = _subsample(_layer_rows(source, res, stream, j, sample), s["pooled_max_rows"], s["seed"])
            layer = PooledLayer(
                res, stream, j, rows["x"], rows["task"], rows["episode"], rows["inf"], rows.get("token"),
                rows.get("slot"), rows.get("per_step"), final, normed, emb, carry, shared,
            )  # fmt: skip
            if name != "expert_1" and "expert_1" in res.streams:  # expert 1 compares itself with these (cka_experts)
                shared.setdefault(name, []).append(inference_gram(layer))
            for m in todo:
                out = m.compute(layer)
                if out is not None:
                    res.pooled.setdefault((name, m.name), [None] * stream.n_layers)[j] = out
            say(f"{name} layer {stream.layers[j]}: pooled metrics done")
