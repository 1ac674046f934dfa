"""Behaviour under closed-loop conditions, against the paired baseline (pure numpy over stored episodes).

Pairing: an episode of a condition store is paired with the baseline store's episode of the same task and initial
state (episode index k) when both ran with the same seed; both then drew the same noise at every inference index
(`openpi.latents.recording.records.episode_noise`), so inference i of the two is compared.

Per condition (definitions, also written into the report):

* success rates per task and pooled, condition minus baseline;
* McNemar's exact test over the paired episodes (init states): b = baseline success & condition failure,
  c = baseline failure & condition success, two-sided p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]);
* an interval over tasks for the success difference: the statistic is the mean over tasks of (condition rate -
  baseline rate), the 95% t interval over the per-task differences (t with K - 1 df: a task bootstrap percentile
  interval undercovers at few tasks); NaN with a reason below two tasks;
* action divergence at paired inference i: RMS over the predicted chunk [H, action_dim] of (condition actions -
  baseline actions), in the env's action units (post-transform `actions`); compared while both episodes still run;
* first divergence: the env step t of the first paired inference whose divergence exceeds `threshold`
  (`DIVERGENCE_THRESHOLD` = 1e-3 action units, far above float noise — identical inputs give exactly 0 — and far
  below a behavioural change; LIBERO actions lie in [-1, 1]); none if it never does.

A layer sweep (conditions `<recipe>@L<l>`, each a single layer) also gives per-layer curves of both; its McNemar
p-values are corrected over the sweep (the family: every layer of one recipe; Holm by default, Benjamini–Hochberg with
``correction="bh"``, `openpi.latents.analysis.stats.multiplicity`), and every table names the family.

Episodes are paired only when their initial simulator states are identical (`openpi.latents.analysis.compare.pairing`:
``init_state_hash`` and the seed); a condition with no pairable episode (e.g. a LIBERO-PRO suite against the standard
suite) is compared unpaired (Fisher's exact test, no action divergence). Action divergence is compared only between
runs under the same batching (`pairing.inference_batching`), else NaN with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import numpy as np
from scipy import stats

from openpi.latents.analysis.compare.pairing import fisher_exact, inference_batching, pairing_refusal, pro_prompt_rows
from openpi.latents.analysis.stats.cluster_t import weighted_cluster_t
from openpi.latents.analysis.stats.multiplicity import CORRECTIONS, adjust

DIVERGENCE_THRESHOLD = 1e-3
# LIBERO-PRO suite names (openpi.envs.libero.PRO_SUITES, spelled out here: the analysis does not import the simulator)
PRO_SUITE_NAMES = frozenset(
    f"{base}_{kind}"
    for base in ("libero_goal", "libero_spatial", "libero_object", "libero_10")
    for kind in ("lan", "object", "swap", "task")
)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c (1.0 when there are none): the exact
    binomial test of b successes in b + c trials at 1/2 (scipy's two-sided binomtest, which for p = 1/2 is
    min(1, 2 · the smaller tail))."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    return float(stats.binomtest(int(b), n, 0.5, alternative="two-sided").pvalue)


def action_divergence(cond: np.ndarray, base: np.ndarray) -> np.ndarray:
    """[n] RMS over each chunk of cond - base ([n_c, H, D] and [n_b, H, D]; the first min(n_c, n_b) inferences)."""
    n = min(len(cond), len(base))
    diff = np.asarray(cond[:n], np.float64) - np.asarray(base[:n], np.float64)
    return np.sqrt((diff**2).reshape(n, -1).mean(-1))


def first_divergence(divergence: np.ndarray, t: np.ndarray, threshold: float = DIVERGENCE_THRESHOLD) -> int | None:
    """The env step t of the first inference whose divergence exceeds `threshold` (None: never)."""
    above = np.flatnonzero(np.asarray(divergence) > threshold)
    return None if above.size == 0 else int(np.asarray(t)[above[0]])


def task_cluster_bootstrap(
    base: dict[int, list[bool]], cond: dict[int, list[bool]], *, n_boot: int, seed: int
) -> tuple[float, float, float, str | None]:
    """(mean over tasks of cond - base success rate, 95% low, high, reason if NaN): the t interval over the per-task
    differences (t with K − 1 df; `n_boot` and `seed` are kept for callers, the interval draws nothing)."""
    tasks = sorted(base)
    d = np.asarray([np.mean(cond[t]) - np.mean(base[t]) for t in tasks], np.float64)
    if len(d) == 0:
        return math.nan, math.nan, math.nan, "no paired episodes"
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan, "a bootstrap over tasks needs two tasks or more"
    est, lo, hi = weighted_cluster_t(d, np.ones_like(d))  # the t interval over tasks (honest at few tasks)
    return est, lo, hi, None


def paired_rates(pairs, task_id: int | None = None) -> tuple[float, float, int]:
    """(first success rate, second success rate, paired episodes) of one task or all (pooled over episodes);
    ``pairs``: (task_id, first succeeded, second succeeded) per paired episode."""
    ps = [(a, b) for t, a, b in pairs if task_id is None or t == task_id]
    if not ps:
        return math.nan, math.nan, 0
    return float(np.mean([a for a, _ in ps])), float(np.mean([b for _, b in ps])), len(ps)


def paired_mcnemar(pairs, task_id: int) -> tuple[int, int, float]:
    """(b = first only succeeded, c = second only succeeded, McNemar's exact p) over one task's paired episodes."""
    ps = [(a, b) for t, a, b in pairs if t == task_id]
    b, c = sum(a and not b for a, b in ps), sum(b and not a for a, b in ps)
    return b, c, mcnemar_exact(b, c)


@dataclasses.dataclass(frozen=True)
class EpisodePair:
    task_id: int
    episode: int
    base_success: bool
    cond_success: bool
    divergence: np.ndarray  # [n paired inferences]
    t: np.ndarray  # env step of each paired inference
    first_divergence_t: int | None


@dataclasses.dataclass(frozen=True)
class ConditionEffect:
    name: str
    root: str
    condition: dict[str, Any]
    pairs: tuple[EpisodePair, ...]
    diff: float  # mean over tasks of (condition - baseline) success rate
    diff_ci: tuple[float, float]
    ci_note: str | None
    b: int
    c: int
    p_mcnemar: float
    # unpaired comparison (no episode could be paired: initial states differ): (task, condition succeeded) and
    # (task, baseline succeeded) over every episode, with Fisher's exact p
    unpaired_reason: str | None = None
    unpaired: tuple[tuple[int, bool, bool], ...] = ()  # (task, is condition, succeeded)
    p_fisher: float = math.nan
    divergence_reason: str | None = None  # why action divergence is not compared (NaN)
    family: str | None = None  # the family its p-value is corrected over (a layer sweep), None: a single test
    suite: str = ""  # the condition store's task suite (shown in every row of the table)
    p_adjusted: float = math.nan  # p_value corrected over `family` (= p_value for a single test)

    @property
    def paired(self) -> bool:
        return self.unpaired_reason is None

    @property
    def test(self) -> str:
        return "McNemar exact (paired)" if self.paired else "Fisher exact (unpaired)"

    @property
    def p_value(self) -> float:
        return self.p_mcnemar if self.paired else self.p_fisher

    @property
    def layer(self) -> int | None:
        layers = self.condition.get("layers")
        return int(layers[0]) if layers and len(layers) == 1 else None

    @property
    def recipe(self) -> str | None:
        return self.condition.get("recipe")

    @property
    def tasks(self) -> list[int]:
        return sorted({p.task_id for p in self.pairs} | {t for t, _, _ in self.unpaired})

    def _outcomes(self) -> list[tuple[int, bool, bool]]:
        return [(p.task_id, p.base_success, p.cond_success) for p in self.pairs]

    def rates(self, task_id: int | None = None) -> tuple[float, float, int]:
        """(baseline rate, condition rate, n episodes) of one task or all (unpaired: n = condition episodes)."""
        if not self.paired:
            sel = [(c, s) for t, c, s in self.unpaired if task_id is None or t == task_id]
            base, cond = [s for c, s in sel if not c], [s for c, s in sel if c]
            if not cond:
                return math.nan, math.nan, 0
            return float(np.mean(base)) if base else math.nan, float(np.mean(cond)), len(cond)
        return paired_rates(self._outcomes(), task_id)

    def task_mcnemar(self, task_id: int) -> tuple[int, int, float]:
        if not self.paired:
            return 0, 0, math.nan
        return paired_mcnemar(self._outcomes(), task_id)

    def mean_divergence(self, task_id: int | None = None) -> float:
        """Mean over paired inferences (pooled over the episodes) of the action divergence (NaN when it is not
        compared: `divergence_reason`)."""
        if self.divergence_reason is not None:
            return math.nan
        ds = [p.divergence for p in self.pairs if task_id is None or p.task_id == task_id]
        ds = [d for d in ds if d.size]
        return float(np.concatenate(ds).mean()) if ds else math.nan

    def diverged(self) -> tuple[int, float]:
        """(episodes that diverged, median first-divergence step over them; NaN if none)."""
        ts = [p.first_divergence_t for p in self.pairs if p.first_divergence_t is not None]
        return len(ts), float(np.median(ts)) if ts else math.nan


@dataclasses.dataclass(frozen=True)
class BehaviourAnalysis:
    baseline: str
    baseline_condition: dict[str, Any]
    effects: tuple[ConditionEffect, ...]
    threshold: float
    n_boot: int
    notes: tuple[str, ...]
    correction: str = "holm"
    pro_prompts: tuple[dict[str, Any], ...] = ()  # per task of a LIBERO-PRO condition: prompt sent vs trained text
    baseline_suite: str = ""

    def layer_curves(self) -> dict[str, list[ConditionEffect]]:
        """recipe -> its single-layer conditions in layer order (a layer sweep)."""
        curves: dict[str, list[ConditionEffect]] = {}
        for e in self.effects:
            if e.recipe is not None and e.layer is not None:
                curves.setdefault(e.recipe, []).append(e)
        return {r: sorted(v, key=lambda e: e.layer) for r, v in curves.items() if len(v) > 1}


# ---------------------------------------------------------------------------------------------------------------------
# Reading stores


def _condition_of(store) -> dict[str, Any]:
    """The manifest's condition; a store from before conditions existed ran the baseline."""
    return dict(store.run_manifest.condition or {"name": "baseline", "prompt_mode": "task", "intervention": None})


def _is_baseline(cond: dict[str, Any]) -> bool:
    return cond.get("prompt_mode") == "task" and cond.get("intervention") is None


def find_stores(root: str | pathlib.Path) -> list[pathlib.Path]:
    """`root` if it is a store, else its direct children that are stores (a multi-condition output dir)."""
    from openpi.latents import store as store_lib

    root = pathlib.Path(root)
    if store_lib.is_store(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and store_lib.is_store(p)) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{root}: neither a latent store nor a directory of condition stores.")
    return found


def _episodes(store) -> dict[tuple[int, int], Any]:
    return {(t, k): store.episode(t, k) for t in store.task_ids() for k in store.episode_indices(t)}


def _pair(base_ep, cond_ep, threshold: float, divergence: bool = True) -> EpisodePair:
    d = action_divergence(cond_ep.read("actions"), base_ep.read("actions")) if divergence else np.zeros(0)
    t = np.asarray(cond_ep.read("t"))[: len(d)]
    bm, cm = base_ep.metadata, cond_ep.metadata
    return EpisodePair(
        base_ep.task_id,
        base_ep.episode_index,
        bool(bm["success"]),
        bool(cm["success"]),
        d,
        t,
        first_divergence(d, t, threshold),
    )


def analyze_conditions(
    roots: list[str | pathlib.Path] | str | pathlib.Path,
    *,
    baseline: str | pathlib.Path | None = None,
    threshold: float = DIVERGENCE_THRESHOLD,
    n_boot: int = 2000,
    seed: int = 0,
    correction: str = "holm",
) -> BehaviourAnalysis:
    """Every condition store of `roots` against the baseline store (`baseline`, else the one whose condition is the
    task prompt with no intervention); see the module docstring for the definitions. ``correction``: "holm"
    (default) or "bh", applied over each layer sweep."""
    from openpi.latents import store as store_lib

    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {correction!r}")
    paths = find_stores(roots) if isinstance(roots, str | pathlib.Path) else [pathlib.Path(r) for r in roots]
    # Compared resolved: an absolute --baseline must be found among relative --conditions (else it pairs with itself).
    paths = [p.expanduser().resolve() for p in paths]
    stores = {p: store_lib.open_store(p) for p in paths}
    if baseline is None:
        candidates = [p for p, s in stores.items() if _is_baseline(_condition_of(s))]
        if len(candidates) != 1:
            raise ValueError(
                f"Found {len(candidates)} baseline stores (task prompt, no intervention) among "
                f"{[str(p) for p in paths]}; pass the baseline store explicitly (or collect with --condition.baseline)."
            )
        baseline = candidates[0]
    base_path = pathlib.Path(baseline).expanduser().resolve()
    base_store = stores.pop(base_path, None) or store_lib.open_store(base_path)
    base_eps = _episodes(base_store)
    notes, effects, pro = [], [], []
    for path, st in stores.items():
        effects.append(_effect(path, st, base_store, base_eps, threshold, n_boot, seed, notes))
        if str(st.run_manifest.suite) in PRO_SUITE_NAMES:
            eps = _episodes(st)
            pro += [{"condition": effects[-1].name, **row} for row in pro_prompt_rows(
                [{"task_id": t, **ep.metadata} for (t, _), ep in sorted(eps.items())]
            )]  # fmt: skip
    effects = _correct_over_sweeps(effects, correction)
    effects.sort(key=lambda e: (e.recipe or "", e.layer if e.layer is not None else -1, e.name))
    return BehaviourAnalysis(
        str(base_path), _condition_of(base_store), tuple(effects), threshold, n_boot, tuple(notes), correction,
        tuple(pro), str(base_store.run_manifest.suite),
    )  # fmt: skip


def _effect(path, st, base_store, base_eps, threshold, n_boot, seed, notes) -> ConditionEffect:
    """One condition against the baseline: paired where the initial states match, else unpaired."""
    cond = _condition_of(st)
    batching = inference_batching(base_store.run_manifest), inference_batching(st.run_manifest)
    same_batching = batching[0] == batching[1]
    suites = base_store.run_manifest.suite, st.run_manifest.suite
    pairs, refused = [], []
    cond_eps = _episodes(st)
    for key, ep in cond_eps.items():
        b_ep = base_eps.get(key)
        why = "no baseline episode" if b_ep is None else pairing_refusal(b_ep.metadata, ep.metadata, *suites)
        if why is not None:
            refused.append(why)
            continue
        pairs.append(_pair(b_ep, ep, threshold, divergence=same_batching))
    unpaired_reason, unpaired, p_fisher = None, (), math.nan
    if refused:
        reasons = sorted(set(refused))
        notes.append(f"{cond['name']}: {len(refused)} episode(s) not paired with the baseline: {'; '.join(reasons)}")
        if not pairs:  # compare unpaired: every episode of the tasks the condition ran
            unpaired_reason = reasons[0]
            tasks = {t for t, _ in cond_eps}
            unpaired = tuple(
                [(t, True, bool(ep.metadata["success"])) for (t, _), ep in sorted(cond_eps.items())]
                + [(t, False, bool(ep.metadata["success"])) for (t, _), ep in sorted(base_eps.items()) if t in tasks]
            )
            p_fisher = fisher_exact([s for _, c, s in unpaired if not c], [s for _, c, s in unpaired if c])
    by_task_b: dict[int, list[bool]] = {}
    by_task_c: dict[int, list[bool]] = {}
    if unpaired_reason is None:
        for p in pairs:
            by_task_b.setdefault(p.task_id, []).append(p.base_success)
            by_task_c.setdefault(p.task_id, []).append(p.cond_success)
    else:
        for t, is_cond, ok in unpaired:
            (by_task_c if is_cond else by_task_b).setdefault(t, []).append(ok)
    diff, lo, hi, why = task_cluster_bootstrap(by_task_b, by_task_c, n_boot=n_boot, seed=seed)
    b = sum(p.base_success and not p.cond_success for p in pairs)
    c = sum(p.cond_success and not p.base_success for p in pairs)
    divergence_reason = None
    if unpaired_reason is not None:
        divergence_reason = f"not paired ({unpaired_reason}): no common inference to compare"
    elif not same_batching:
        divergence_reason = (
            f"baseline {batching[0]}, condition {batching[1]} inference: batching alone moves bf16 actions by up to "
            "0.016, above the divergence threshold; collect both with --no-batch-inference (or in one command)"
        )
    return ConditionEffect(
        str(cond["name"]), str(path), cond, tuple(pairs), diff, (lo, hi), why, b, c,
        mcnemar_exact(b, c) if unpaired_reason is None else math.nan, unpaired_reason, unpaired, p_fisher,
        divergence_reason, suite=str(st.run_manifest.suite),
    )  # fmt: skip


def _correct_over_sweeps(effects: list[ConditionEffect], correction: str) -> list[ConditionEffect]:
    """Each condition's p-value corrected over its family: the single-layer conditions of one recipe (a layer sweep,
    two layers or more); any other condition is a single test (p_adjusted = p_value)."""
    families: dict[str, list[int]] = {}
    for i, e in enumerate(effects):
        if e.recipe is not None and e.layer is not None:
            families.setdefault(e.recipe, []).append(i)
    out = [dataclasses.replace(e, p_adjusted=e.p_value) for e in effects]
    for recipe, idx in families.items():
        if len(idx) < 2:
            continue
        adjusted = adjust([effects[i].p_value for i in idx], correction)
        name = f"{recipe} layer sweep: {len(idx)} layers, {CORRECTIONS[correction]}"
        for i, p in zip(idx, adjusted):
            out[i] = dataclasses.replace(out[i], family=name, p_adjusted=float(p))
    return out
