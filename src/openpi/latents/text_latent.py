"""Text latents (arXiv 2505.03500): per-task averages of expert 0's text-token states, and their injection.

Definition (what `build_text_latents` computes). For task K of a collection and captured layer l:

    latent[K, l, j] = mean over records r of task K of text_only_hidden_states[r, l, batch 0, j]   (j < n_K)

* records r: every rollout step (= inference) of every complete episode of task K, each weighted equally (an
  episode with more inferences weighs more, as in the paper's average over all timesteps of all trajectories);
* tokens j: the text-window positions 0 .. n_K - 1 that are valid (`text_mask`) for the task's prompt, each kept
  separately (no average over tokens); invalid positions are 0. Every record of a task must carry the same prompt
  (the positions must mean the same tokens), else building raises;
* layers l: the collection's captured layers (`capture_spec.layers`, model layer ids), each separately; the state
  is the residual stream entering layer l (layer 0: the embedded prompt), averaged in float64 from the stored dtype.

`token_means[K, l] = mean over j < n_K of latent[K, l, j]` (each valid token weighted equally) is the latent's
per-layer vector, what the "steer" injection adds.

Injection (`injection`, used by `--condition.text-latent`): "steer" adds
``scale * ((1 - a) * token_means[K] + a * token_means[J])`` to every text token of expert 0 entering each latent
layer (the paper adds the latent back to the text hidden states; a per-layer vector also reaches a blank prompt's
few valid tokens); "patch" replaces the first n text positions by ``(1 - a) * latent[K] + a * latent[J]`` (n = the
valid count, the smaller one for a blend) — only positions the prompt marks valid are attended to, so "patch" is
meant for a prompt at least n tokens long (e.g. another task's instruction). The blend weight a is fixed, or
ramps linearly with the inference index (the paper's temporal interpolation from task K's behaviour to task J's).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from openpi.latents.store.manifest import RunManifest

if TYPE_CHECKING:
    from openpi.models.pi0_config import Pi0Config

FORMAT = "openpi-text-latents/1"
KEY = "text_only_hidden_states"


@dataclasses.dataclass(frozen=True)
class TextLatents:
    """Per-task text latents: arrays indexed by the position of the task in `task_ids`."""

    task_ids: tuple[int, ...]
    layers: tuple[int, ...]  # model layer ids
    latents: np.ndarray  # [n_tasks, L', T, W] float32
    token_means: np.ndarray  # [n_tasks, L', W] float32
    num_valid: np.ndarray  # [n_tasks] int
    text_mask: np.ndarray  # [n_tasks, T] bool
    counts: np.ndarray  # [n_tasks] records averaged
    n_episodes: np.ndarray  # [n_tasks]
    metadata: dict[str, Any]

    def index(self, task_id: int) -> int:
        if task_id not in self.task_ids:
            raise ValueError(f"No text latent for task {task_id}: the file has tasks {list(self.task_ids)}.")
        return self.task_ids.index(task_id)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metadata"}
        arrays["task_ids"], arrays["layers"] = np.asarray(self.task_ids), np.asarray(self.layers)
        np.savez(path, metadata=np.asarray(json.dumps({"format": FORMAT, **self.metadata})), **arrays)
        return path


def load(path: str | pathlib.Path) -> TextLatents:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--condition.text-latent {path}: no such file; build one with scripts/build_text_latents.py."
        )
    with np.load(path, allow_pickle=False) as f:
        metadata = json.loads(str(f["metadata"]))
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a text-latent file ({FORMAT}); build one with build_text_latents.py.")
        return TextLatents(
            task_ids=tuple(int(t) for t in f["task_ids"]),
            layers=tuple(int(x) for x in f["layers"]),
            **{k: f[k] for k in ("latents", "token_means", "num_valid", "text_mask", "counts", "n_episodes")},
            metadata=metadata,
        )


def _layer_ids(manifest: RunManifest, n_stored: int) -> tuple[int, ...]:
    """Model layer ids of the stored layers: the capture spec's (negative ids resolved with the model's depth)."""
    from openpi.latents.analysis.data.labels import model_depth

    layers = manifest.capture("layers")
    if layers is None:
        return tuple(range(n_stored))
    depth = model_depth(manifest)[0] if any(int(x) < 0 for x in layers) else None
    return tuple(int(x) % depth if depth else int(x) for x in layers)


def _task_latent(store, task_id: int) -> tuple[np.ndarray, np.ndarray, int, int, str]:
    """(latent [L', T, W], mask [T], records, episodes, prompt) of one task."""
    total, mask, count, prompts = None, None, 0, set()
    episodes = store.episode_indices(task_id)
    for k in episodes:
        ep = store.episode(task_id, k)
        if KEY not in ep.keys():
            raise ValueError(
                f"{store.root}: episode {k} of task {task_id} has no {KEY}; collect with --capture.text (the default)."
            )
        prompts |= {str(p) for p in np.atleast_1d(ep.read("prompt"))}
        masks = ep.read("text_mask")[:, 0]  # [S, T]
        if mask is None:
            mask = masks[0]
        if not (masks == mask).all() or len(prompts) > 1:
            raise ValueError(
                f"{store.root}: task {task_id} was recorded under several prompts ({sorted(prompts)}); a text latent "
                "averages token positions of ONE prompt. Build it from a collection with the task's own prompt."
            )
        h = ep.read(KEY)[:, :, 0].astype(np.float64)  # [S, L', T, W]
        total = h.sum(0) if total is None else total + h.sum(0)
        count += h.shape[0]
    if not count:
        raise ValueError(f"{store.root}: task {task_id} has no complete episode with a rollout step.")
    latent = np.where(mask[None, :, None], total / count, 0.0)
    return latent, mask, count, len(episodes), prompts.pop()


def build_text_latents(root: str | pathlib.Path, task_ids: list[int] | None = None) -> TextLatents:
    """Text latents of every task (or `task_ids`) of a latent store; the definition is this module's docstring."""
    from openpi.latents import store as store_lib

    store = store_lib.open_store(root)
    tasks = task_ids or store.task_ids()
    rows = [_task_latent(store, t) for t in tasks]
    latents = np.stack([r[0] for r in rows]).astype(np.float32)
    masks = np.stack([r[1] for r in rows])
    num_valid = masks.sum(-1)
    token_means = (latents.sum(2) / np.maximum(num_valid, 1)[:, None, None]).astype(np.float32)
    manifest = store.run_manifest
    metadata = {
        "source": str(root),
        "preset": manifest.preset,
        "checkpoint": manifest.checkpoint,
        "suite": manifest.suite,
        "condition": manifest.condition,
        "text_start": manifest.text_start,
        "prompts": {str(t): r[4] for t, r in zip(tasks, rows, strict=True)},
        "definition": "mean over every rollout step of every complete episode of the task of expert 0's residual "
        "stream entering each captured layer at each valid text token (per token, per layer; float64 average)",
    }
    return TextLatents(
        task_ids=tuple(int(t) for t in tasks),
        layers=_layer_ids(manifest, latents.shape[1]),
        latents=latents,
        token_means=token_means,
        num_valid=num_valid.astype(np.int64),
        text_mask=masks,
        counts=np.asarray([r[2] for r in rows]),
        n_episodes=np.asarray([r[3] for r in rows]),
        metadata=metadata,
    )


class InjectionSettings(Protocol):
    """The ``text_latent*`` settings of an injection (the collection's `conditions.ConditionArgs` has them; the
    latents are upstream of the collection, so this names only what it reads)."""

    text_latent: pathlib.Path | None
    text_latent_task: int | None
    text_latent_blend_task: int | None
    text_latent_alpha: float
    text_latent_schedule: str
    text_latent_ramp: int
    text_latent_mode: str
    text_latent_scale: float


def blend_weight(c: InjectionSettings, i: int) -> float:
    """The blend task's weight at inference i (0 without a blend task)."""
    if c.text_latent_blend_task is None:
        return 0.0
    if c.text_latent_schedule == "fixed":
        return float(c.text_latent_alpha)
    return float(c.text_latent_alpha) * min(1.0, i / max(c.text_latent_ramp, 1))


def injection(c: InjectionSettings, config: Pi0Config):
    """(inference index -> Intervention, details for the manifest) of `c`'s text-latent injection."""
    from openpi.models import intervention as iv

    tl = load(c.text_latent)
    if c.text_latent_task is None:
        raise ValueError("--condition.text-latent needs --condition.text-latent-task K (whose latent to inject).")
    width, tokens = config.paligemma_config.width, config.max_token_len
    if tl.latents.shape[2:] != (tokens, width):
        raise ValueError(
            f"{c.text_latent}: latents have [T, W] = {list(tl.latents.shape[2:])} but the model's text window is "
            f"[{tokens}, {width}]; build the latents from a collection of the same model."
        )
    if c.text_latent_ramp < 1 or not 0.0 <= c.text_latent_alpha <= 1.0:
        raise ValueError("--condition.text-latent-alpha must be in [0, 1] and --condition.text-latent-ramp >= 1.")
    a_idx = tl.index(c.text_latent_task)
    b_idx = a_idx if c.text_latent_blend_task is None else tl.index(c.text_latent_blend_task)
    layers = tl.layers
    if c.text_latent_mode == "steer":
        va, vb = tl.token_means[a_idx], tl.token_means[b_idx]

        def at(i: int):
            w = blend_weight(c, i)
            return iv.steer(0, "text", layers, ((1 - w) * va + w * vb).astype(np.float32), c.text_latent_scale)
    else:
        n = int(min(tl.num_valid[a_idx], tl.num_valid[b_idx]))
        pa, pb = tl.latents[a_idx, :, None, :n], tl.latents[b_idx, :, None, :n]  # [L', 1, n, W]
        span = (config.layout.text_start, config.layout.text_start + n)

        def at(i: int):
            w = blend_weight(c, i)
            return iv.patch(0, span, layers, ((1 - w) * pa + w * pb).astype(np.float32))

    details = {
        "file": str(c.text_latent),
        "task": c.text_latent_task,
        "blend_task": c.text_latent_blend_task,
        "alpha": c.text_latent_alpha if c.text_latent_blend_task is not None else None,
        "schedule": c.text_latent_schedule if c.text_latent_blend_task is not None else None,
        "ramp_inferences": c.text_latent_ramp if c.text_latent_schedule == "linear" else None,
        "mode": c.text_latent_mode,
        "scale": c.text_latent_scale if c.text_latent_mode == "steer" else None,
        "layers": list(layers),
        "source": tl.metadata.get("source"),
        "source_prompts": tl.metadata.get("prompts"),
    }
    return at, details
