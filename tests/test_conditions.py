"""Closed-loop conditions (prompt modes, interventions, layer sweeps, text latents, LIBERO-PRO) and their behavioural
analysis.

Unit tests first (no simulator); then one shared real-LIBERO run (module fixture `runs`): the tiny random-weight
preset on libero_goal task 0, one 10-step episode (2 inferences) per condition, all condition stores in one
directory: a layer sweep with its baseline, a blank prompt, a task swap, a text-latent run; plus one LIBERO-PRO run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import pathlib
from typing import ClassVar

import numpy as np
import pytest

from openpi.envs import libero as L
from openpi.latents import collect as collection
from openpi.latents import store, text_latent
from openpi.latents.analysis.compare import behaviour as B
from openpi.latents.collect import conditions as C
from openpi.policies import policy_config, presets

SUITE, TASK_ID, STEPS, DENOISE = "libero_goal", 0, 10, 2
TINY = presets.get_preset("pi0_libero_tiny").model_config


# ---------------------------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 6, 2 / 64),  # 2 * (1/2)^6 = 0.03125
        (6, 0, 2 / 64),
        (0, 5, 2 / 32),
        (1, 9, 2 * 11 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10
        (3, 3, 1.0),  # 2 * P[X <= 3 | n = 6] = 2 * 42/64 > 1 -> 1
        (0, 0, 1.0),  # no discordant pair
        (0, 1, 1.0),
    ],
)
def test_mcnemar_exact_known_p_values(b, c, p):
    assert B.mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)


def test_action_divergence_and_first_divergence_step():
    base = np.zeros((4, 50, 7))
    cond = base.copy()
    cond[2] += 0.3  # RMS of a constant 0.3 difference is 0.3
    cond[3, 0, 0] = 7.0  # one entry: RMS = sqrt(49 / 350)
    d = B.action_divergence(cond, base[:4])
    np.testing.assert_allclose(d, [0, 0, 0.3, math.sqrt(49 / 350)])
    t = np.array([0, 5, 10, 15])
    assert B.first_divergence(d, t) == 10
    assert B.first_divergence(np.zeros(4), t) is None
    assert B.first_divergence(np.array([0, B.DIVERGENCE_THRESHOLD, 1, 1]), t) == 10  # strictly above the threshold
    assert B.action_divergence(cond[:3], base).shape == (3,)  # only inferences both episodes ran


def test_task_cluster_bootstrap():
    base = {0: [True, False], 1: [False, False], 2: [True, True]}
    cond = {0: [False, False], 1: [False, False], 2: [False, True]}
    d, lo, hi, why = B.task_cluster_bootstrap(base, cond, n_boot=500, seed=0)
    assert why is None and d == pytest.approx((-0.5 + 0 - 0.5) / 3)
    # the t interval over the 3 per-task differences {-0.5, 0, -0.5}: sd 0.5/√3, se sd/√3, t_{2, 0.975} = 4.3027
    half = 4.302652729911275 * (0.5 / np.sqrt(3)) / np.sqrt(3)
    assert lo == pytest.approx(d - half) and hi == pytest.approx(d + half)
    d1, lo1, hi1, why1 = B.task_cluster_bootstrap({0: [True]}, {0: [False]}, n_boot=10, seed=0)
    assert d1 == -1.0 and math.isnan(lo1) and math.isnan(hi1) and "two tasks" in why1


# ---------------------------------------------------------------------------------------------------------------------
# Conditions without the simulator


def test_condition_names_and_sweep_expansion():
    sweep = C.ConditionArgs(intervention="knockout-text", sweep_layers=True, baseline=True)
    names = [C.condition_name(c) for c in C.expand(sweep, depth=4)]
    assert names == ["baseline", "knockout-text@L0", "knockout-text@L1", "knockout-text@L2", "knockout-text@L3"]
    assert C.condition_name(C.ConditionArgs(prompt="blank")) == "blank"
    assert C.condition_name(C.ConditionArgs(prompt="other-task", other_task_offset=2)) == "other-task+2"
    with pytest.raises(ValueError, match=r"needs --condition\.intervention"):
        C.expand(C.ConditionArgs(sweep_layers=True), depth=4)


def _tasks(suite):
    return tuple(L.TaskInfo(suite, i, f"t{i}", f"instruction {i}", 50, "f.bddl") for i in range(3))


@pytest.mark.parametrize(
    ("cond", "fragment"),
    [
        (C.ConditionArgs(prompt="text"), "--condition.prompt-text"),
        (C.ConditionArgs(prompt_text="x"), "only used with --condition.prompt text"),
        (C.ConditionArgs(intervention="knockout-everything"), "neither a recipe"),
        (C.ConditionArgs(intervention="steer"), "--condition.steer-vector"),
        (C.ConditionArgs(intervention="knockout-text", layers=(9,)), "this model has 4 layers"),
        (C.ConditionArgs(text_latent_task=1), "--condition.text-latent latents.npz"),
    ],
)
def test_bad_conditions_raise_naming_the_flag(cond, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        C.resolve(cond, TINY, num_steps=DENOISE, list_tasks=_tasks)


def test_prompt_modes_and_json_intervention(tmp_path):
    task = _tasks("s")[2]
    prompts = {
        mode: C.resolve(C.ConditionArgs(prompt=mode, prompt_text="hi" if mode == "text" else None), TINY,
                        num_steps=DENOISE, list_tasks=_tasks).prompt_of(task)
        for mode in ("task", "blank", "other-task", "text")
    }  # fmt: skip
    assert prompts == {"task": "instruction 2", "blank": "", "other-task": "instruction 0", "text": "hi"}
    np.save(tmp_path / "v.npy", np.ones(TINY.paligemma_config.width, np.float32))
    steer = {"op": "steer", "expert": 0, "tokens": "text", "layers": [2], "vector": "v.npy", "alpha": 2.0}
    spec = {"ops": [{"op": "knockout", "queries": "suffix", "keys": "text", "layers": [1]}, steer]}
    (tmp_path / "iv.json").write_text(json.dumps(spec))
    cond = C.resolve(C.ConditionArgs(intervention=str(tmp_path / "iv.json")), TINY, num_steps=2, list_tasks=_tasks)
    ops = cond.describe()["intervention"]["ops"]
    assert [o["op"] for o in ops] == ["knockout", "steer"] and ops[1]["vector"]["shape"] == [64]
    assert cond.name == "iv" and not cond.is_baseline


def _synthetic_latents(tmp_path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    n_layers, tokens, width = TINY.depth, TINY.max_token_len, TINY.paligemma_config.width
    latents = rng.standard_normal((2, n_layers, tokens, width)).astype(np.float32)
    mask = np.zeros((2, tokens), bool)
    mask[0, :5], mask[1, :8] = True, True
    latents[~mask[:, None, :, None].repeat(n_layers, 1).repeat(width, 3)] = 0
    tl = text_latent.TextLatents(
        task_ids=(0, 1), layers=tuple(range(n_layers)), latents=latents,
        token_means=latents.sum(2) / mask.sum(1)[:, None, None], num_valid=mask.sum(1), text_mask=mask,
        counts=np.array([3, 3]), n_episodes=np.array([1, 1]), metadata={"source": "synthetic"},
    )  # fmt: skip
    return tl.save(tmp_path / "tl.npz")


def test_text_latent_injection_blend_and_schedule(tmp_path):
    path = _synthetic_latents(tmp_path)
    tl = text_latent.load(path)
    base = dict(text_latent=path, text_latent_task=0, text_latent_blend_task=1, text_latent_alpha=0.5)
    fixed = C.resolve(C.ConditionArgs(prompt="blank", **base), TINY, num_steps=2, list_tasks=_tasks)
    (op,) = fixed.intervention_at(7).ops
    np.testing.assert_allclose(op.vector, 0.5 * tl.token_means[0] + 0.5 * tl.token_means[1], rtol=1e-6)
    assert op.layers == tuple(range(TINY.depth)) and op.tokens == "text"
    ramp = C.ConditionArgs(text_latent_schedule="linear", text_latent_ramp=4, text_latent_mode="patch", **base)
    cond = C.resolve(ramp, TINY, num_steps=2, list_tasks=_tasks)
    for i, w in [(0, 0.0), (2, 0.25), (4, 0.5), (9, 0.5)]:  # a * min(1, i / ramp)
        (op,) = cond.intervention_at(i).ops
        assert op.tokens == (TINY.text_start, TINY.text_start + 5)  # the shorter latent's 5 valid tokens
        expected = (1 - w) * tl.latents[0, :, None, :5] + w * tl.latents[1, :, None, :5]
        np.testing.assert_allclose(op.values, expected, rtol=1e-6, atol=1e-7)
    assert cond.describe()["text_latent"]["schedule"] == "linear"
    with pytest.raises(ValueError, match="No text latent for task 5"):
        C.resolve(dataclasses.replace(ramp, text_latent_task=5), TINY, num_steps=2, list_tasks=_tasks)


# ---------------------------------------------------------------------------------------------------------------------
# LIBERO-PRO suites (task lists only)


@pytest.mark.libero
def test_libero_pro_suites_are_complete_and_prompted_with_the_bddl_text():
    for suite in L.PRO_SUITES:
        tasks = L.list_tasks(suite)
        assert len(tasks) == 10 and {t.num_init_states for t in tasks} == {50}, suite
        assert L.max_steps(suite) == L.MAX_STEPS[L.PRO_SUITES[suite]]
    task = L.get_task("libero_goal_task", 0)
    assert task.language == "open the bottom drawer of the cabinet"  # the BDDL's (:language ...)
    assert task.package_language == "open the middle drawer of the cabinet"  # task.language: the unperturbed text
    # The standard suites keep task.language (openpi), although their BDDL's text may differ.
    goal = L.get_task("libero_goal", 0)
    assert goal.language == goal.package_language == "open the middle drawer of the cabinet"
    assert L.bddl_language(goal.bddl_file) == "open the middle layer of the drawer"


# ---------------------------------------------------------------------------------------------------------------------
# Closed loop on the real simulator


class _TrackedEnv(L.LiberoEnv):
    """The real LiberoEnv, noting the instruction LIBERO's env parsed from the BDDL."""

    instructions: ClassVar[list[str]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _TrackedEnv.instructions.append(self.language_instruction)


@dataclasses.dataclass
class Runs:
    root: pathlib.Path  # the condition stores
    pro: pathlib.Path  # the LIBERO-PRO store
    latents: pathlib.Path
    sweep: list


def _args(output_dir, **condition) -> collection.CollectionArgs:
    return collection.CollectionArgs(
        preset="pi0_libero_tiny", task_suite=condition.pop("suite", SUITE), task_ids=(TASK_ID,), episodes_per_task=1,
        max_steps=STEPS, num_denoise_steps=DENOISE, output_dir=output_dir,
        condition=C.ConditionArgs(**condition),
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("conditions") / "runs"
    policy = policy_config.create_trained_policy(
        "pi0_libero_tiny", sample_kwargs={"num_steps": DENOISE}, rng_seed=L.DEFAULT_SEED
    )
    _TrackedEnv.instructions.clear()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(L, "LiberoEnv", _TrackedEnv)
        sweep = collection.collect_conditions(
            _args(root, intervention="knockout-text", sweep_layers=True, layers=(0, 2), baseline=True), policy=policy
        )
        collection.collect_conditions(_args(root / "blank", prompt="blank"), policy=policy)
        collection.collect_conditions(_args(root / "swap", prompt="other-task"), policy=policy)
        latents = text_latent.build_text_latents(root / "baseline").save(root.parent / "tl.npz")
        collection.collect_conditions(
            _args(root / "text-latent", prompt="blank", text_latent=latents, text_latent_task=TASK_ID), policy=policy
        )
        pro = root.parent / "pro"
        collection.collect_conditions(_args(pro, suite="libero_goal_task"), policy=policy)
    return Runs(root, pro, latents, sweep)


def _episode(path: pathlib.Path):
    return store.open_store(path).episode(TASK_ID, 0)


@pytest.mark.libero
def test_libero_pro_run_stores_the_bddl_instruction(runs):
    ep = _episode(runs.pro)
    bddl = "open the bottom drawer of the cabinet"
    assert _TrackedEnv.instructions[-1] == bddl  # the env's language_instruction
    assert set(ep.read("prompt")) == {bddl} and ep.metadata["prompt"] == bddl
    assert ep.metadata["task_language"] == bddl
    assert store.open_store(runs.pro).task_info(TASK_ID)["language"] == bddl
    assert bddl != L.get_task("libero_goal_task", TASK_ID).package_language


@pytest.mark.libero
def test_sweep_layout_manifest_and_episode_metadata(runs):
    assert [r.name for r in runs.sweep] == ["baseline", "knockout-text@L0", "knockout-text@L2"]
    for run in runs.sweep:
        path = runs.root / run.name
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["condition"]["name"] == run.name
        meta = _episode(path).metadata
        assert meta["condition"]["name"] == run.name and meta["seed"] == L.DEFAULT_SEED
    ops = json.loads((runs.root / "knockout-text@L2" / "manifest.json").read_text())["condition"]["intervention"]
    assert ops["ops"] == [{"op": "knockout", "queries": "all", "keys": "text", "layers": [2], "heads": None}]
    assert json.loads((runs.root / "baseline" / "manifest.json").read_text())["condition"]["intervention"] is None


@pytest.mark.libero
def test_prompts_stored_and_paired_runs_draw_the_same_noise(runs):
    base = _episode(runs.root / "baseline")
    swap_prompt = L.get_task(SUITE, TASK_ID + 1).language
    expected = {"blank": "", "swap": swap_prompt, "knockout-text@L0": base.metadata["prompt"]}
    for name, prompt in expected.items():
        ep = _episode(runs.root / name)
        assert set(ep.read("prompt")) == {prompt} and ep.metadata["prompt"] == prompt, name
        assert ep.read("noise").shape == base.read("noise").shape == (2, TINY.action_horizon, TINY.action_dim)
        np.testing.assert_array_equal(ep.read("noise"), base.read("noise"))  # same (task, init state, seed)
    # The first inference sees the same observation: the prompt / knockout alone changes the actions.
    np.testing.assert_array_equal(_episode(runs.root / "blank").read("image")[0], base.read("image")[0])
    assert not np.array_equal(_episode(runs.root / "blank").read("actions")[0], base.read("actions")[0])
    assert not np.array_equal(_episode(runs.root / "knockout-text@L0").read("actions")[0], base.read("actions")[0])


@pytest.mark.libero
def test_text_latent_run_and_its_latents(runs):
    tl = text_latent.load(runs.latents)
    base = _episode(runs.root / "baseline")
    h = base.read("text_only_hidden_states")[:, :, 0].astype(np.float64)  # [S, L, T, W]
    mask = base.read("text_mask")[0, 0]
    np.testing.assert_allclose(tl.latents[0][:, mask], h.mean(0)[:, mask], rtol=1e-5, atol=1e-6)
    assert (tl.latents[0][:, ~mask] == 0).all() and tl.num_valid[0] == mask.sum() and tl.counts[0] == 2
    ep = _episode(runs.root / "text-latent")
    assert ep.metadata["prompt"] == "" and ep.metadata["condition"]["text_latent"]["task"] == TASK_ID
    np.testing.assert_array_equal(ep.read("noise"), base.read("noise"))
    # Injecting the latent changes the blank-prompt run's actions.
    blank = _episode(runs.root / "blank")
    assert not np.array_equal(ep.read("actions")[0], blank.read("actions")[0])


@pytest.mark.libero
def test_behaviour_analysis_and_report_section(runs, tmp_path):
    beh = B.analyze_conditions(runs.root)
    assert beh.baseline.endswith("baseline")
    names = [e.name for e in beh.effects]
    assert set(names) == {"blank", "other-task+1", "blank+text-latent-T0", "knockout-text@L0", "knockout-text@L2"}
    for e in beh.effects:
        (pair,) = e.pairs
        base, cond = _episode(runs.root / "baseline"), _episode(pathlib.Path(e.root))
        d = np.sqrt(((cond.read("actions").astype(np.float64) - base.read("actions")) ** 2).mean(axis=(1, 2)))
        np.testing.assert_allclose(pair.divergence, d[: len(pair.divergence)], rtol=1e-9)
        assert pair.first_divergence_t == 0  # the first inference already differs (checked above)
        assert e.p_mcnemar == B.mcnemar_exact(e.b, e.c)
    assert [e.layer for e in beh.layer_curves()["knockout-text"]] == [0, 2]

    import importlib.util
    import sys

    script = pathlib.Path(__file__).parents[1] / "scripts" / "expert_language_analysis.py"
    spec = importlib.util.spec_from_file_location("ela", script)
    ela = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ela", ela)  # dataclasses look their module up there
    spec.loader.exec_module(ela)
    out = tmp_path / "report"
    with contextlib.redirect_stdout(io.StringIO()):
        ela.main(ela.Args(collection=runs.root / "baseline", output_dir=out, conditions=runs.root, text_decoding=False,
                          probe_shuffles=0, n_boot=50))  # fmt: skip
    text = (out / "report.md").read_text()
    assert "## Behaviour under conditions" in text and "`knockout-text@L2`" in text
    assert "McNemar" in text and "paired baseline" in text
    for name in ("behaviour_condition_task.png", "behaviour_per_layer.png", "behaviour.csv"):
        assert (out / name).stat().st_size > 0
