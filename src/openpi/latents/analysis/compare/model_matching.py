"""Two collections of two models (pi0 vs pi0.5, or two checkpoints) on the same episodes: the models, the check that
the collections are matched, and the paired episode outcomes.

Two collections (latent stores, one model each: the manifest's ``model_config``, ``preset`` and ``checkpoint``) are
**matched** when they ran the same condition of the same suite on the same tasks (ids and task language) with the same
episodes, and every episode k of task t has the same initial-state index, seed, prompt and step budget in both
(:func:`match_collections`, reading manifests and episode attrs only; anything else is refused before any analysis,
naming each mismatch and its fix). Episode (t, k) of model A is then **paired** with episode (t, k) of model B: both
start from the same initial state with the same seed, so their first observation is the same; after it each model's
own actions drive the scene. What is compared: :mod:`openpi.latents.analysis.compare.model_comparison`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from openpi.latents.analysis.compare.behaviour import _condition_of
from openpi.latents.analysis.data.labels import model_depth
from openpi.latents.store.manifest import RunManifest

# Episode attrs that must agree between paired episodes (when either run recorded them).
EPISODE_KEYS = ("init_state_index", "seed", "prompt", "max_steps", "task_language")
_FIX = {
    "init_state_index": "collect both with the same --episodes-per-task (episode k starts from init state k)",
    "seed": "collect both with the same --seed",
    "prompt": "collect both under the same --condition.prompt",
    "max_steps": "collect both with the same --max-steps",
    "task_language": "collect both with the same --task-suite (and the same libero package)",
}
MAX_LISTED = 12


class CollectionMismatchError(ValueError):
    """The two collections cannot be paired episode by episode (the message lists every mismatch and its fix)."""


@dataclasses.dataclass(frozen=True)
class ModelSide:
    """One model of the comparison, from its collection's manifest."""

    root: str
    preset: str | None
    checkpoint: str | None
    model_config: str | None
    family: str  # "pi0", "pi0.5" or "unknown" (model_config not a Pi0Config description)
    depth: int | None
    action_horizon: int | None
    suffix_segments: tuple[str, ...]
    # pi0.5 only: whether the prompt carries the discretised robot state (from the preset, resolved by the caller;
    # None: unknown). pi0 always reads the state through its state token.
    discrete_state_input: bool | None = None
    label: str = ""  # short name in tables and legends (the family, disambiguated when both share it)
    text_window: int | None = None  # stored text positions (max_token_len), from the analysis

    @property
    def identity(self) -> tuple[str | None, str | None, str | None]:
        return self.model_config, self.preset, self.checkpoint

    @property
    def state_input(self) -> str:
        """How this model receives the robot state."""
        if self.family == "pi0":
            return "state token (expert-1 token 0: a linear projection of the normalised state)"
        if self.family != "pi0.5":
            return "unknown (model_config is not a Pi0Config description)"
        if self.discrete_state_input is None:
            return "no state token; whether the prompt carries the discretised state is not known for this preset"
        if self.discrete_state_input:
            return "no state token; the state is in the prompt as 256-bin digits (expert-0 text tokens)"
        return "none: no state token and a prompt without the state (the model never sees the robot state)"


def describe_side(
    root: str, manifest: RunManifest | Mapping[str, Any], discrete_state_input: bool | None = None
) -> ModelSide:
    """A :class:`ModelSide` from a collection manifest (the model code is imported only to parse its config)."""
    manifest = RunManifest.of(manifest)
    text = manifest.model_config
    family, horizon = "unknown", None
    if text:
        from openpi.models import pi0_config

        try:
            config = pi0_config.Pi0Config.from_description(str(text))
            family, horizon = ("pi0.5" if config.pi05 else "pi0"), config.action_horizon
        except ValueError:
            family = "pi0.5" if "pi05=True" in str(text) else "unknown"
    return ModelSide(
        root=root,
        preset=manifest.preset,
        checkpoint=manifest.checkpoint,
        model_config=text,
        family=family,
        depth=model_depth(manifest)[0],
        action_horizon=horizon,
        suffix_segments=tuple(manifest.suffix_segment_names or ()),
        discrete_state_input=discrete_state_input if family == "pi0.5" else None,
    )


def _labelled(a: ModelSide, b: ModelSide) -> tuple[ModelSide, ModelSide]:
    """Short labels: the families, else the presets, else the checkpoints, else A / B."""
    for field in ("family", "preset", "checkpoint"):
        la, lb = str(getattr(a, field)), str(getattr(b, field))
        if la != lb:
            if field != "family":
                la, lb = f"{a.family} {la}", f"{b.family} {lb}"
            return dataclasses.replace(a, label=la), dataclasses.replace(b, label=lb)
    return dataclasses.replace(a, label=f"A: {a.family}"), dataclasses.replace(b, label=f"B: {b.family}")


@dataclasses.dataclass(frozen=True)
class PairedOutcome:
    task_id: int
    episode: int
    a: bool  # success of model A's episode
    b: bool  # success of model B's episode


@dataclasses.dataclass(frozen=True)
class MatchedCollections:
    """Two matched collections and their paired outcomes (:func:`match_collections`)."""

    a: ModelSide
    b: ModelSide
    suite: str | None
    condition: dict[str, Any]
    languages: dict[int, str]  # task id -> task language
    pairs: tuple[PairedOutcome, ...]  # paired episodes without an error in either run
    excluded: tuple[str, ...]  # why paired episodes were left out (errors)
    checked: tuple[str, ...]  # what was checked equal


def _episode_meta(st, task_ids: Sequence[int]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(t, k): dict(st.episode(t, k).metadata) for t in task_ids for k in st.episode_indices(t)}


def _listed(problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = len(problems) - len(shown)
    return "\n".join(f"  * {p}" for p in shown) + (f"\n  * ... ({more} more)" if more > 0 else "")


def match_collections(
    path_a: str | pathlib.Path,
    path_b: str | pathlib.Path,
    *,
    task_ids: Sequence[int] | None = None,
    discrete_state_input: tuple[bool | None, bool | None] = (None, None),
) -> MatchedCollections:
    """Checks (reading manifests and episode attrs only) that the two stores can be paired and pairs them.

    Raises :class:`CollectionMismatchError` listing every mismatch with its fix: another suite or condition, the same
    model on both sides, other task ids, task language or episodes, or a paired episode whose initial state, seed,
    prompt or step budget differs. ``task_ids`` restricts both to those tasks (the analysis' ``--task-ids``).
    """
    from openpi.latents import store as store_lib

    stores = []
    for p in (path_a, path_b):
        if not store_lib.is_store(p):
            raise CollectionMismatchError(
                f"{p}: not a latent store; the model comparison (--compare) pairs the episodes of two latent stores "
                "(collect with the default --output-format store)."
            )
        stores.append(store_lib.open_store(p))
    sa, sb = stores
    a = describe_side(str(path_a), sa.run_manifest, discrete_state_input[0])
    b = describe_side(str(path_b), sb.run_manifest, discrete_state_input[1])
    head = f"{a.family} `{path_a}` vs {b.family} `{path_b}`"
    if a.identity == b.identity:
        raise CollectionMismatchError(
            f"{head}: both collections ran the same model ({a.preset}, checkpoint {a.checkpoint}); --compare takes "
            "the other model's collection (e.g. a pi05_libero run of the same tasks, episodes and seed)."
        )
    problems = []
    for what, va, vb, fix in (
        ("suite", sa.run_manifest.suite, sb.run_manifest.suite, "collect both with the same --task-suite"),
        (
            "condition",
            _condition_of(sa),
            _condition_of(sb),
            "compare two runs of the same condition (e.g. both baselines: the task prompt, no intervention)",
        ),
    ):
        if json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            problems.append(f"{what}: {json.dumps(va)} vs {json.dumps(vb)} — {fix}")
    tasks_a, tasks_b = set(sa.task_ids()), set(sb.task_ids())
    if task_ids:
        wanted = {int(t) for t in task_ids}
        for name, have in (("A", tasks_a), ("B", tasks_b)):
            if wanted - have:
                problems.append(f"--task-ids {sorted(wanted - have)} not in collection {name} (tasks {sorted(have)})")
        tasks_a, tasks_b = tasks_a & wanted, tasks_b & wanted
    common = sorted(tasks_a & tasks_b)
    if tasks_a != tasks_b:
        problems.append(
            f"task ids: {sorted(tasks_a)} vs {sorted(tasks_b)} — collect the missing tasks (--task-ids), or restrict "
            f"the analysis to the common tasks with --task-ids {' '.join(map(str, common)) or '...'}"
        )
    languages = {}
    for t in common:
        la, lb = sa.task_info(t).get("language"), sb.task_info(t).get("language")
        if la != lb:
            problems.append(f"task {t} language: {la!r} vs {lb!r} — {_FIX['task_language']}")
        languages[t] = la
    meta_a, meta_b = _episode_meta(sa, common), _episode_meta(sb, common)
    for t in common:
        ka = {k for (tt, k) in meta_a if tt == t}
        kb = {k for (tt, k) in meta_b if tt == t}
        if ka != kb:
            problems.append(
                f"task {t} episodes: {sorted(ka)} vs {sorted(kb)} — finish the shorter run (--resume with the same "
                "--episodes-per-task) or collect both with the same --episodes-per-task"
            )
    pairs, excluded = [], []
    for key in sorted(set(meta_a) & set(meta_b)):
        ma, mb = meta_a[key], meta_b[key]
        for field in EPISODE_KEYS:
            if (field in ma or field in mb) and ma.get(field) != mb.get(field):
                problems.append(
                    f"task {key[0]} episode {key[1]} {field}: {ma.get(field)!r} vs {mb.get(field)!r} — {_FIX[field]}"
                )
        errors = [f"{n}: {m['error']}" for n, m in (("A", ma), ("B", mb)) if m.get("error")]
        if errors:
            excluded.append(f"task {key[0]} episode {key[1]} ended with an error ({'; '.join(errors)})")
        else:
            pairs.append(PairedOutcome(key[0], key[1], bool(ma.get("success")), bool(mb.get("success"))))
    if problems:
        raise CollectionMismatchError(
            f"The two collections are not matched ({head}), so their episodes cannot be paired by task and initial "
            f"state:\n{_listed(problems)}"
        )
    if not pairs:
        raise CollectionMismatchError(f"{head}: no paired episode without an error; nothing to compare.")
    a, b = _labelled(a, b)
    checked = (
        "suite",
        "condition",
        "task ids",
        "task language",
        "episode indices",
        *(f"per-episode {f}" for f in EPISODE_KEYS),
    )
    return MatchedCollections(
        a, b, sa.run_manifest.suite, _condition_of(sa), languages, tuple(pairs), tuple(excluded), checked
    )


# ---------------------------------------------------------------------------------------------------------------------
# Finding the other model among condition stores


def find_comparison(
    conditions: str | pathlib.Path, primary: str | pathlib.Path
) -> tuple[pathlib.Path | None, list[pathlib.Path], list[pathlib.Path]]:
    """(the other model's baseline store or None, the stores of the primary collection's model, the other model's
    stores) among the stores of ``conditions`` (a store or a directory of stores, as ``--conditions`` takes).

    A second model is looked for only when the primary collection's model is among the stores (a directory of another
    single model's conditions stays a behaviour analysis of that model). Raises ValueError when the stores hold more
    than two models, or the other model has no single baseline store.
    """
    from openpi.latents import store as store_lib
    from openpi.latents.analysis.compare.behaviour import _is_baseline, find_stores

    paths = find_stores(conditions)
    manifests = {p: store_lib.open_store(p).run_manifest for p in paths}

    def identity(m: RunManifest) -> tuple:
        return m.model_config, m.preset, m.checkpoint

    mine = identity(store_lib.open_store(primary).run_manifest)
    ids = {identity(m) for m in manifests.values()}
    if mine not in ids or len(ids) == 1:
        return None, paths, []
    if len(ids) > 2:
        raise ValueError(
            f"The stores of {conditions} hold {len(ids)} models ({sorted(ids, key=str)}); the comparison pairs two. "
            "Pass the other model's collection with --compare, and --conditions a directory of one model's stores."
        )
    theirs = [p for p in paths if identity(manifests[p]) != mine]
    base = [p for p in theirs if _is_baseline(_condition_of(store_lib.open_store(p)))]
    if len(base) != 1:
        other = identity(manifests[theirs[0]])
        raise ValueError(
            f"{conditions} holds stores of a second model ({other[1]}, {other[2]}) but {len(base)} baseline stores of "
            f"it (task prompt, no intervention) among {[str(p) for p in theirs]}; pass the one to compare with "
            "--compare PATH."
        )
    return base[0], [p for p in paths if identity(manifests[p]) == mine], theirs
