"""How a collection is analysed: :class:`AnalysisSettings`, one frozen value for the main and the control analysis.

Grouped by concern (what is read, text decoding, the task probe, statistics, pooled metrics). The analysis CLI embeds
these groups as its flag groups (``scripts/expert_language_analysis.py``: field names are the flag names), and
:func:`openpi.latents.analysis.analyze_collection` takes one ``settings`` plus flat keyword overrides
(``analyze_collection(data, n_boot=100)``: :meth:`AnalysisSettings.replace`). A control collection is analysed with
the very same object, so no setting can be dropped on the way to it.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import tyro

# How success is compared with failure. "step" (default): at equal rollout steps among the episodes still running,
# within task; "progress": normalised progress (secondary: confounded by episode length); "common": the first N steps
# (N = the shortest episode); "all".
WINDOWS = ("step", "progress", "common", "all")
DEFAULT_WINDOW = "step"


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """What is read."""

    # Only these task ids (default: all).
    task_ids: tuple[int, ...] | None = None
    # Open pickles (unpickling executes code from the file: only for files you trust).
    allow_pickle: bool = False
    # Analyse a damaged store's intact episodes (by default a damaged store is refused, listing the damage).
    skip_damaged: bool = False
    # Rollout steps of one layer read per block, in bytes (bounds memory; the CLI's --max-block-mib).
    max_block_bytes: Annotated[int, tyro.conf.Suppress] = 64 << 20


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """Text decoding (text reconstruction, the logit lens) and which text tokens count."""

    # Decode text at every k-th rollout step only (text decoding dominates the cost at full size).
    text_step_stride: int = 1
    # Keep BOS and the trailing "\n" in text decoding, the text probe and attention to text (default: left out; they
    # are the same for every prompt).
    include_constant_tokens: bool = False


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """The task probe (task id decoded from each stream's pooled features, folds grouped by episode)."""

    # Run the task probe (needs two tasks or more).
    probe: bool = True
    # Task-probe cross-validation folds (grouped by episode).
    probe_splits: int = 5
    # Shuffled-label refits of the task-probe control (0 skips the control).
    probe_shuffles: int = 10


@dataclasses.dataclass(frozen=True)
class StatisticsSettings:
    """Intervals and tests (the unit of resampling is the task)."""

    # Bootstrap resamples for every confidence interval.
    n_boot: int = 1000
    # Seed of everything random (bootstrap, probe folds, permutations, row subsamples).
    seed: int = 0
    # Permutations of the probe's p-value (a ridge classifier refit in closed form: floor 1/(n+1)) and of the
    # within-task success test.
    n_permutations: int = 1000
    # How success is compared with failure: "step" (default: at equal rollout steps among the episodes still
    # running, within task; episode length cannot make a gap), "progress" (a secondary view: bins of normalised
    # progress through each episode; confounded by length, as successes end early), "common" (the first N rollout
    # steps, N = fewest any episode has) or "all" (each episode's own steps: length-confounded).
    success_window: Literal["step", "progress", "common", "all"] = "step"
    # Bins of normalised progress of the "progress" window and the progress heatmaps.
    progress_bins: int = 10


@dataclasses.dataclass(frozen=True)
class PooledSettings:
    """Pooled metrics (token-identity probe, tuned lens, CKA, effective rank) on a sample of every episode's steps."""

    # Compute the pooled metrics.
    pooled: bool = True
    # Held-out unit of the token probe and the tuned lens: "task" (prompts never seen in training) or "episode".
    pooled_split: Literal["task", "episode"] = "task"
    # Evenly spaced rollout steps per episode in the pooled sample.
    pooled_steps_per_episode: int = 2
    # Rows per layer (subsampled with the seed, the same rows for every layer).
    pooled_max_rows: int = 4000
    # Rows behind each CKA gram ([N, N] float64 per stored layer).
    cka_rows: int = 1000
    # Held-out rows the tuned lens decodes against the whole vocabulary.
    lens_eval_rows: int = 512
    # The token probe's control task: every prompt slot (task, position) relabelled with another slot's token.
    token_probe_control: Literal["slot"] = "slot"


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """Every setting of one analysis, by group; read as ``settings.stats.n_boot`` (see the module docstring)."""

    read: ReadSettings = ReadSettings()
    text: TextSettings = TextSettings()
    probe: ProbeSettings = ProbeSettings()
    stats: StatisticsSettings = StatisticsSettings()
    pooled: PooledSettings = PooledSettings()

    def __post_init__(self):
        s, p = self.stats, self.pooled
        if s.success_window not in WINDOWS:
            raise ValueError(f"success_window must be one of {WINDOWS}, got {s.success_window!r}")
        if s.progress_bins < 1:
            raise ValueError(f"progress_bins must be >= 1, got {s.progress_bins}")
        if p.pooled_split not in ("task", "episode"):
            raise ValueError(f"pooled_split must be 'task' or 'episode', got {p.pooled_split!r}")
        if p.pooled_steps_per_episode < 1:
            raise ValueError(f"pooled_steps_per_episode must be >= 1, got {p.pooled_steps_per_episode}")
        flat = self.flat()
        for name in ("text_step_stride", "max_block_bytes"):
            if flat[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {flat[name]}")

    @staticmethod
    def groups() -> dict[str, type]:
        """{group field: its dataclass}."""
        return dict(_GROUPS)

    def flat(self) -> dict[str, Any]:
        """Every setting by its (unique) name, as metrics.json records them."""
        out: dict[str, Any] = {}
        for group in self.groups():
            g = getattr(self, group)
            out |= {f.name: getattr(g, f.name) for f in dataclasses.fields(g)}
        if out["task_ids"] is not None:
            out["task_ids"] = list(out["task_ids"])
        return out

    def replace(self, **flat: Any) -> AnalysisSettings:
        """A copy with the named settings changed (flat names: ``replace(n_boot=100, pooled=False)``)."""
        owner = {f.name: group for group, cls in self.groups().items() for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise TypeError(f"unknown analysis settings {unknown}; known: {sorted(owner)}")
        changes: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name == "task_ids" and value is not None:
                value = tuple(value)
            changes.setdefault(owner[name], {})[name] = value
        return dataclasses.replace(
            self, **{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in changes.items()}
        )


_GROUPS = {
    "read": ReadSettings,
    "text": TextSettings,
    "probe": ProbeSettings,
    "stats": StatisticsSettings,
    "pooled": PooledSettings,
}
