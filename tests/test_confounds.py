"""Known answers of issue 18 (no default misleads): the success split against episode length, small-cluster interval
coverage, one value of centred drift, prompt decoding with content-free states, pairing across initial states."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import math
import pathlib
import sys

import numpy as np
import pytest
from test_analysis import BF16, Synth, build_store

from openpi.latents import analysis as A
from openpi.latents.analysis.stats import clustered as C
from openpi.latents.analysis.stats.equal_step import equal_step_difference

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------------
# 1. The success split at equal rollout steps


def _length_confounded(n_tasks=6, per_side=4, seed=0, effect=0.0):
    """Per-step values whose law depends on the step only (+ a task offset); successes 20–45 steps, failures 60.
    ``effect`` is added to the successes at every step (a planted effect at equal steps)."""
    rng = np.random.default_rng(seed)
    vals, succ, tasks = [], [], []
    for t in range(n_tasks):
        for s in (True, False):
            for _ in range(per_side):
                n = int(rng.integers(20, 46)) if s else 60
                i = np.arange(n)
                vals.append(0.01 * i + 0.05 * rng.standard_normal(n) + 0.3 * t + (effect if s else 0.0))
                succ.append(s)
                tasks.append(t)
    return vals, np.array(succ), np.array(tasks)


def test_equal_step_length_only_metric_reads_zero_and_planted_effect_is_found():
    vals, succ, tasks = _length_confounded()
    d = equal_step_difference(vals, succ, tasks, n_permutations=200)
    assert d.difference.low < 0 < d.difference.high and abs(d.difference.estimate) < 0.01
    assert d.n_tasks_contributing == 6 and d.difference.unit == "task"
    # at risk: every episode runs at step 0; after step 45 no success is left, so those steps do not count
    assert d.at_risk.n_success[0] == 24 and d.at_risk.n_failure[0] == 24
    assert d.at_risk.n_success[50] == 0 and d.at_risk.n_failure[50] == 0 and d.at_risk.n_steps_compared <= 45
    # the per-episode mean (what progress alignment reduces to) reads the length as a gap
    old = C.within_task_difference([v.mean() for v in vals], succ, tasks)
    assert old.difference.high < -0.05
    planted = equal_step_difference(*_length_confounded(effect=0.05)[:3], n_permutations=200)
    assert planted.difference.low > 0.03 and planted.difference.high < 0.07 and planted.p_value < 0.01


def _step_only_record(syn: Synth):
    """A record whose every state and attention mass depends on the rollout step i only: the states turn away from
    the first step's by 0.1 rad per step (drift grows with the step), the attention masses grow by 0.01 per step."""
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((2, syn.W)).astype(np.float32)
    v -= u * (u @ v) / (u @ u)
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)

    def rec(t, k, i):
        r = syn.record(t, 0, i, rng=np.random.default_rng(i))  # the same law for every episode at step i
        noise = np.random.default_rng([t, k, i])  # ... plus episode noise of that law
        x = np.cos(0.1 * i) * u + np.sin(0.1 * i) * v
        for key in ("text_only_hidden_states", "expert_0_segment_means", "expert_1_segment_means"):
            shape = r[key].shape
            r[key] = (np.broadcast_to(x, shape) + 0.02 * noise.standard_normal(shape)).astype(BF16)
        for key in ("attention_to_text", "attention_to_text_content", "attention_to_bos"):
            r[key] = (0.05 + 0.01 * i + 0.005 * noise.random(r[key].shape)).astype(np.float32)
        return r

    return rec


def test_default_command_reads_no_gap_from_length_alone(tmp_path):
    """Successes run 3–5 rollout steps, failures 8; every drift and attention metric depends on the step only.
    The default command's within-task success − failure interval contains 0 for every one of them (under the old
    progress default drift read a gap)."""
    syn = Synth()
    root = build_store(
        tmp_path / "s", _step_only_record(syn), tasks=(0, 1, 2), episodes=6,
        steps=lambda t, k: 3 + (k + t) % 3 if k < 3 else 8, success=lambda t, k: k < 3,
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location("ela", REPO / "scripts" / "expert_language_analysis.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules["ela"] = cli
    spec.loader.exec_module(cli)
    with contextlib.redirect_stdout(io.StringIO()):
        args = cli.Args(collection=root, output_dir=tmp_path / "rep", text_decoding=False, probe_shuffles=0, n_boot=200)
        out = cli.main(args)
    rel = out["metrics"]["success_relation"]
    checked = 0
    for m in ("drift", "centred_drift", "attention_to_text", "attention_to_text_normalised", "attention_to_bos"):
        for s, entry in rel.get(m, {}).items():
            if entry.get("per_layer") is None:
                continue
            for layer in entry["per_layer"]:
                w = layer["within_task"]["difference"]
                assert w["low"] <= 0 <= w["high"], (m, s, w)
                checked += 1
    assert checked >= 9  # drift ×3 streams, attention on expert 1, ... each at 3 layers
    at = out["metrics"]["success_split"]["at_risk"]
    assert out["metrics"]["success_split"]["window"] == "step"
    assert at["n_success"][:3] == [9, 9, 9] and at["n_failure"][:8] == [9] * 8 and at["n_success"][5:] == [0] * 3
    # the secondary progress view reads the length as a gap in drift
    res = A.analyze_collection(root, embedding=None, probe=False, success_window="progress", n_boot=200, pooled=False)
    assert all(x.difference.low > 0 or x.difference.high < 0 for x in res.within_task_split("text_only", "drift"))


# --------------------------------------------------------------------------------------------------------------------
# 6. Intervals over few tasks, centred drift


def _coverage(n_tasks: int, reps: int, seed: int) -> float:
    """Coverage of the default task-cluster interval of a mean: tasks with a normal random effect (sd 1), 4–12
    episodes each with noise sd 0.5; the truth is 0."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(reps):
        sizes = rng.integers(4, 13, n_tasks)
        effects = rng.standard_normal(n_tasks)
        values = np.concatenate([e + 0.5 * rng.standard_normal(n) for e, n in zip(effects, sizes)])
        tasks = np.repeat(np.arange(n_tasks), sizes)
        ci = C.cluster_bootstrap_ci(values, tasks, n_boot=200)
        hits += ci.low <= 0 <= ci.high
    return hits / reps


@pytest.mark.parametrize("n_tasks", [3, 5, 10])
def test_cluster_intervals_cover_at_few_tasks(n_tasks):
    """Nominal 0.95; the percentile task bootstrap covered 0.76 / 0.85 / 0.90 here. 1000 draws: ± 0.014 (2 sd)."""
    assert _coverage(n_tasks, 1000, seed=n_tasks) >= 0.92


def test_centred_drift_has_one_value_everywhere(tmp_path):
    """Centred drift is 0 at step 0 by definition: left out of every summary, so per_layer.csv (mean over episodes of
    the per-episode means) and the split's sides agree, and a per-episode mean is the mean of its steps 1..n-1."""
    syn = Synth()
    root = build_store(tmp_path / "s", _step_only_record(syn), tasks=(0, 1), episodes=4, steps=4,
                       success=lambda t, k: k < 2)  # fmt: skip
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=100, success_window="progress", pooled=False)
    for s in ("text_only", "expert_0", "expert_1"):
        steps = res.step_values[(s, "centred_drift")]
        assert all((v[0] == 0).all() for v in steps) and np.nanmax(steps[0]) > 0
        want = np.mean([v[1:].mean(0) for v in steps], axis=0)
        np.testing.assert_allclose([c.estimate for c in res.per_layer(s, "centred_drift")], want, rtol=1e-9)
        for j, x in enumerate(res.success_split(s, "centred_drift")):  # equal sides: success, failure = the mean
            both = (x.success.estimate * x.n_success + x.failure.estimate * x.n_failure) / (x.n_success + x.n_failure)
            assert both == pytest.approx(want[j], rel=1e-9)
    from openpi.latents import report

    report.write_report(res, tmp_path / "rep")
    with open(tmp_path / "rep" / "per_layer.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "centred_drift" and r["stream"] == "text_only"]
    want = np.mean([v[1:].mean(0) for v in res.step_values[("text_only", "centred_drift")]], axis=0)
    np.testing.assert_allclose([float(r["mean"]) for r in rows], want, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# 3, 5, 6. Conditions: pairing by initial state, batching, the sweep's family


def _condition_store(root, condition, outcomes, *, suite="libero_goal", hashes=None, arguments=None, shift=0.0):
    """A condition store: task 0, one episode per outcome, 2 inferences each (actions = k + shift)."""
    from openpi.latents.store import LatentStoreWriter

    man = {"kind": "synthetic", "suite": suite, "condition": condition, "arguments": arguments or {}}
    with LatentStoreWriter.create_or_open(root, man, resume=False) as w:
        task = {"task_id": 0, "task_name": "t0", "suite": suite, "language": "do it"}
        for k, ok in enumerate(outcomes):
            attrs = {"seed": 7, "prompt": condition.get("prompt", "do it"), "trained_instruction": "do it"}
            if hashes is not None:
                attrs["init_state_hash"] = hashes[k]
            ep = w.begin_episode(task, k, attrs)
            for i in range(2):
                ep.append_step({"t": 5 * i, "actions": np.full((4, 7), k + shift, np.float32)})
            ep.finish({"success": bool(ok), "total_steps": 10, "error": None})
    return pathlib.Path(root)


BASE = {"name": "baseline", "prompt_mode": "task", "intervention": None}


def _sweep_layer(layer):
    return {"name": f"knockout-text@L{layer}", "prompt_mode": "task", "recipe": "knockout-text", "layers": [layer],
            "intervention": {"spec": "knockout-text"}}  # fmt: skip


def test_layer_sweep_p_values_are_corrected_over_the_sweep(tmp_path):
    from openpi.latents.analysis.compare import behaviour as B
    from openpi.latents.report.behaviour import behaviour_section

    base = [True] * 10
    _condition_store(tmp_path / "c" / "baseline", BASE, base)
    fails = {0: 0, 1: 6, 2: 8}  # layer -> baseline successes turned to failures (b); c = 0
    for layer, b in fails.items():
        _condition_store(tmp_path / "c" / f"L{layer}", _sweep_layer(layer), [k >= b for k in range(10)])
    beh = B.analyze_conditions(tmp_path / "c")
    raw = [B.mcnemar_exact(b, 0) for b in fails.values()]  # 1, 2/2^6, 2/2^8
    holm = [1.0, min(1, 2 * raw[1]), min(1, 3 * raw[2])]  # sorted: raw[2]·3, raw[1]·2, raw[0]·1
    assert [e.p_mcnemar for e in beh.effects] == pytest.approx(raw)
    assert [e.p_adjusted for e in beh.effects] == pytest.approx(holm)
    assert all(e.family.startswith("knockout-text layer sweep: 3 layers, Holm") for e in beh.effects)
    bh = B.analyze_conditions(tmp_path / "c", correction="bh")
    assert [e.p_adjusted for e in bh.effects] == pytest.approx([1.0, 1.5 * raw[1], 3 * raw[2]])
    text = "\n".join(behaviour_section(beh, tmp_path / "rep"))
    assert "knockout-text layer sweep: 3 layers, Holm" in text and "p adjusted" in text


def test_pro_condition_is_not_paired_with_other_initial_states(tmp_path):
    """A LIBERO-PRO condition's initial states differ from the standard suite's: no McNemar pairing, an unpaired
    Fisher test, no divergence, and the prompt sent is shown against the trained instruction."""
    from openpi.latents.analysis.compare import behaviour as B
    from openpi.latents.report.behaviour import behaviour_section

    _condition_store(tmp_path / "c" / "baseline", BASE, [True] * 6, hashes=["a"] * 6)
    pro = {"name": "pro", "prompt_mode": "task", "intervention": None, "prompt": "open the middle layer"}
    _condition_store(tmp_path / "c" / "pro", pro, [False] * 6, suite="libero_goal_swap", hashes=["b"] * 6)
    beh = B.analyze_conditions(tmp_path / "c", baseline=tmp_path / "c" / "baseline")
    (e,) = beh.effects
    assert not e.paired and e.pairs == () and "initial simulator states differ" in e.unpaired_reason
    assert math.isnan(e.p_mcnemar) and e.p_value == pytest.approx(2 / 924)  # Fisher: 6/6 vs 0/6, 2·C(12,6)⁻¹
    assert e.rates() == (1.0, 0.0, 6) and math.isnan(e.mean_divergence()) and "not paired" in e.divergence_reason
    assert beh.pro_prompts == ({"condition": "pro", "task_id": 0, "prompt_sent": "open the middle layer",
                                "trained_instruction": "do it", "same_text": False},)  # fmt: skip
    text = "\n".join(behaviour_section(beh, tmp_path / "rep"))
    assert "Fisher exact (unpaired)" in text and "| `pro` | 0 | open the middle layer | do it | False |" in text
    # stores without digests: paired within a suite, refused across suites
    _condition_store(tmp_path / "d" / "baseline", BASE, [True] * 2)
    _condition_store(tmp_path / "d" / "pro", pro, [False] * 2, suite="libero_goal_lan")
    (e,) = B.analyze_conditions(tmp_path / "d", baseline=tmp_path / "d" / "baseline").effects
    assert not e.paired and "suites differ" in e.unpaired_reason


def test_divergence_is_compared_only_under_the_same_batching(tmp_path):
    from openpi.latents.analysis.compare import behaviour as B

    batched = {"num_envs": 2, "batch_inference": True}
    _condition_store(tmp_path / "c" / "baseline", BASE, [True] * 2, arguments=batched, shift=1e-2)
    noop = {**_sweep_layer(0), "name": "steer0", "recipe": "steer"}
    _condition_store(tmp_path / "c" / "steer0", noop, [True] * 2, arguments=batched)
    (e,) = B.analyze_conditions(tmp_path / "c").effects
    assert e.paired and math.isnan(e.mean_divergence()) and "baseline batched, condition single" in e.divergence_reason
    _condition_store(tmp_path / "d" / "baseline", BASE, [True] * 2, arguments={**batched, "batch_inference": False})
    _condition_store(tmp_path / "d" / "steer0", noop, [True] * 2, arguments=batched)
    (e,) = B.analyze_conditions(tmp_path / "d").effects
    assert e.divergence_reason is None and e.mean_divergence() == 0.0


def test_a_command_mixing_interventions_and_plain_runs_runs_all_unbatched():
    from openpi.latents import collect as collection
    from openpi.latents.collect.sweep import condition_args

    cond = collection.ConditionArgs(intervention="knockout-text", layers=(0,), baseline=True)
    args = collection.CollectionArgs(preset="pi0_libero_tiny", num_envs=2, condition=cond)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        runs = condition_args(args)
    assert [r.batch_inference for _, r in runs] == [False, False] and "--no-batch-inference" in out.getvalue()
    plain = collection.CollectionArgs(preset="pi0_libero_tiny", num_envs=2,
                                      condition=collection.ConditionArgs(prompt="blank", baseline=True))  # fmt: skip
    assert [r.batch_inference for _, r in condition_args(plain)] == [True, True]  # both batched: comparable


@pytest.mark.libero
def test_pro_initial_states_differ_from_the_standard_suites():
    from openpi.envs import libero as L

    goal, lan = L.list_tasks("libero_goal"), L.list_tasks("libero_goal_lan")
    assert all(L.init_state_digest(a, 0) != L.init_state_digest(b, 0) for a, b in zip(goal, lan))  # 0/10 match
    assert L.init_state_digest(goal[0], 3) == L.init_state_digest(goal[0], 3) != L.init_state_digest(goal[0], 4)
    swap = L.list_tasks("libero_goal_swap")
    assert sum(s.language != s.package_language for s in swap) == 5  # 5/10 swap prompts are rewordings too


# --------------------------------------------------------------------------------------------------------------------
# 2. Matched-observation prompt decoding


def _decoding_store(root, cf_prompt_of, state_of, n_tasks=4, episodes=6, steps=2):
    """Tasks with prompts "p<t>"; each episode reruns with ``cf_prompt_of(t, k)``; expert 0's base / rerun states
    from ``state_of(t, cf_task, rng)`` -> (base [L, 1, 4, W], cf)."""
    from test_analysis import with_cf

    from openpi.latents.store import LatentStoreWriter

    syn = Synth()
    man = {"kind": "synthetic", "segment_names": ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb", "text"]}
    with LatentStoreWriter.create_or_open(root, man, resume=False) as w:
        for t in range(n_tasks):
            task = {"task_id": t, "task_name": f"task{t}", "suite": "synthetic", "language": f"p{t}"}
            for k in range(episodes):
                cf_t = cf_prompt_of(t, k)
                cf_p = "" if cf_t is None else f"p{cf_t}"
                ep = w.begin_episode(task, k, {"prompt": f"p{t}", "counterfactual_prompt": cf_p})
                for i in range(steps):
                    rng = np.random.default_rng([t, k, i])
                    r = syn.record(t, k, i, rng=rng)
                    base, cf = state_of(t, cf_t, rng, r["expert_0_segment_means"].shape)
                    r["expert_0_segment_means"] = base.astype(BF16)
                    c = dict(r, prompt=cf_p, expert_0_segment_means=cf.astype(BF16))
                    ep.append_step(with_cf(r, c, keys=("expert_0_segment_means", "actions")))
                ep.finish({"success": False, "total_steps": 5 * steps, "error": None})
    return pathlib.Path(root)


def test_prompt_decoding_content_free_states_read_at_scene_chance(tmp_path):
    """States with only a scene-specific "not my instruction" shift carry no rerun content: with the rerun prompt
    drawn at random per episode they read at the scene-aware chance; with the next task's prompt (a function of the
    scene) decoding is refused; blank reruns are refused; states that do carry the rerun prompt read ≈ 1."""
    from openpi.latents.collect.args import other_task_draw

    rng0 = np.random.default_rng(0)
    scenes, shifts, codes = (3 * rng0.standard_normal((4, 16)) for _ in range(3))

    def content_free(t, cf_t, rng, shape):
        noise = 0.3 * rng.standard_normal((2, *shape))
        return np.broadcast_to(scenes[t], shape) + noise[0], np.broadcast_to(scenes[t] + shifts[t], shape) + noise[1]

    def carrying(t, cf_t, rng, shape):
        noise = 0.3 * rng.standard_normal((2, *shape))
        return (np.broadcast_to(scenes[t] + codes[t], shape) + noise[0],
                np.broadcast_to(scenes[t] + codes[cf_t], shape) + noise[1])  # fmt: skip

    def analyse(name, cf_of, states):
        root = _decoding_store(tmp_path / name, cf_of, states)
        res = A.analyze_collection(root, embedding=None, probe=False, n_boot=100, pooled=False)
        summary = res.shared.get(("prompt_decoding_summary", "expert_0", 2))
        return res, summary

    random_cf = lambda t, k: other_task_draw(7, t, k, 4)  # noqa: E731
    res, s = analyse("free", random_cf, content_free)
    print("content-free", s.pair_accuracy, s.scene_chance, s.chance)
    assert 0.3 < s.scene_chance < 0.8 and s.pair_accuracy <= s.scene_chance + 0.1, (s.pair_accuracy, s.scene_chance)
    res, s = analyse("next", lambda t, k: (t + 1) % 4, content_free)
    assert s is None and "single rerun prompt" in res.missing["expert_0.prompt_decoding"]
    assert not res.has("expert_0", "prompt_decoding") and "single rerun" in res.reason("expert_0", "prompt_decoding")
    res, s = analyse("blank", lambda t, k: None, content_free)
    assert s is None and "blank" in res.missing["expert_0.prompt_decoding"]
    res, s = analyse("content", random_cf, carrying)
    print("content", s.pair_accuracy, s.scene_chance)
    assert s.pair_accuracy >= 0.9 and s.pair_accuracy > s.scene_chance + 0.2


def test_other_task_counterfactual_is_drawn_at_random_per_episode():
    from openpi.latents import synthetic_collection as sc
    from openpi.latents.collect.args import other_task_draw

    spec = sc.SyntheticCollection(("a", "b", "c", "d"), n_episodes=8, seed=3)
    for t, own in enumerate(spec.prompts):
        drawn = [spec.counterfactual_prompt(t, k) for k in range(8)]
        assert own not in drawn and len(set(drawn)) >= 2  # never the task's own, not a function of the task
    assert [other_task_draw(3, 0, k, 4) for k in range(8)] == [other_task_draw(3, 0, k, 4) for k in range(8)]


@pytest.mark.libero
@pytest.mark.slow
def test_noop_intervention_with_two_envs_reads_divergence_zero(tmp_path):
    """steer with α = 0 is an exact no-op; with --num-envs 2 the plain baseline would be batched and the steer run
    not, and batching alone moves the actions. One command runs both unbatched: divergence exactly 0."""
    from openpi.latents import collect as collection
    from openpi.latents.analysis.compare import behaviour as B
    from openpi.policies import presets

    width = presets.get_preset("pi0_libero_tiny").model_config.paligemma_config.width
    vector = tmp_path / "v.npy"
    np.save(vector, np.random.default_rng(0).standard_normal(width).astype(np.float32))
    cond = collection.ConditionArgs(intervention="steer", steer_vector=vector, alpha=0.0, baseline=True, name="noop")
    args = collection.CollectionArgs(
        preset="pi0_libero_tiny", task_suite="libero_goal", task_ids=(0,), episodes_per_task=2, max_steps=10,
        num_denoise_steps=2, num_envs=2, output_dir=str(tmp_path / "runs"), condition=cond,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        collection.collect_conditions(args)
    (e,) = B.analyze_conditions(tmp_path / "runs").effects
    assert e.name == "noop" and e.divergence_reason is None and len(e.pairs) == 2
    assert all(p.divergence.size and (p.divergence == 0).all() for p in e.pairs) and e.diverged() == (0, ANY_NAN)


ANY_NAN = type("AnyNaN", (), {"__eq__": lambda self, other: isinstance(other, float) and math.isnan(other)})()


def test_bf16_precision_floor_is_reported_beside_the_comparison_metrics(tmp_path):
    """bf16 keeps 8 significant bits: a pre-image within half an ulp differs by U(−½, ½)·ulp, ulp/|x| in
    (2^-8, 2^-7], so the relative-L2 floor lies in (2^-8/√12, 2^-7/√12] = (0.00113, 0.00226]."""
    from openpi.latents import report

    syn = Synth()
    root = build_store(tmp_path / "s", lambda t, k, i: syn.record(t, k, i), tasks=(0, 1), episodes=2, steps=3)
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=50, pooled=False)
    assert set(res.precision_floor) == {"text_only", "expert_0", "expert_1"}
    for stream, per_layer in res.precision_floor.items():
        assert len(per_layer) == syn.L
        for f in per_layer:
            assert 2**-8 / np.sqrt(12) < f["prompt_sensitivity"] <= 2**-7 / np.sqrt(12), (stream, f)
            assert 0 < f["drift"] < 1e-5
    data = report.write_report(res, tmp_path / "rep")
    entry = data["metrics"]["drift"]["expert_1"]
    assert entry["bf16_floor"] == pytest.approx([f["drift"] for f in res.precision_floor["expert_1"]])
    assert data["metrics"]["language_loss"]["text_only"].get("bf16_floor") is None  # not a comparison metric
    assert "Precision floor (bf16 precision floor" in (tmp_path / "rep" / "report.md").read_text()
