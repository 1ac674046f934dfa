"""The model comparison (pi0 vs pi0.5 on the same episodes): pairing and its statistics on hand-made outcomes, the
matching check and the relative-depth axis on hand-made stores, the report section on two matched collections of the
tiny presets, and the CLI on a real-LIBERO pair.

The known-answer pair: `pi0_libero_tiny` and `pi05_libero_tiny` run through the synthetic collection (no simulator:
2 prompts × 3 episodes × 2 inferences on random LIBERO-style observations, other-task counterfactual reruns), with the
episode outcomes set by a judge to known flags, so every paired count in the report is known in advance (a random
model never succeeds on LIBERO, where every count would be 0).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pathlib
import sys

import numpy as np
import pytest

from openpi.latents import store
from openpi.latents.analysis.compare import model_matching as MM
from openpi.latents.analysis.compare.model_comparison import paired_success
from openpi.latents.analysis.compare.model_matching import CollectionMismatchError, PairedOutcome, match_collections
from openpi.policies import presets

PI0, PI05 = presets.get_preset("pi0_libero_tiny"), presets.get_preset("pi05_libero_tiny")

# Known outcomes per task (episode k = list index): A = pi0, B = pi0.5.
FLAGS_A = {0: [False, False, True], 1: [True, False, False]}
FLAGS_B = {0: [True, True, True], 1: [True, True, False]}
# By hand: b (A success, B failure) = 0; c (A failure, B success) = 2 (task 0) + 1 (task 1) = 3;
# McNemar p = 2 · P[Bin(3, ½) ≤ 0] = 2/8 = 0.25; Δ per task = 3/3 − 1/3 = 2/3 and 2/3 − 1/3 = 1/3, mean 1/2; resampling
# the two tasks gives means 1/3, 1/2 or 2/3 (1/3 and 2/3 each with probability 1/4 > 2.5%): the interval is [1/3, 2/3].


def _outcomes(flags_a, flags_b) -> list[PairedOutcome]:
    return [PairedOutcome(t, k, a, b) for t in flags_a for k, (a, b) in enumerate(zip(flags_a[t], flags_b[t]))]


def test_paired_success_on_hand_made_outcomes():
    s = paired_success(_outcomes(FLAGS_A, FLAGS_B), n_boot=2000, seed=0)
    assert (s.b, s.c) == (0, 3) and s.p_mcnemar == pytest.approx(0.25, abs=1e-12)
    assert s.diff == pytest.approx(0.5) and s.ci_note is None
    # the t interval over the per-task differences {1/3, 2/3}: 0.5 ± t_{1, 0.975}/6 (t_{1, 0.975} = 12.7062)
    assert s.diff_ci == pytest.approx((0.5 - 12.706204736174698 / 6, 0.5 + 12.706204736174698 / 6))
    assert s.rates() == pytest.approx((2 / 6, 5 / 6, 6))
    assert s.rates(0) == pytest.approx((1 / 3, 1.0, 3)) and s.rates(1) == pytest.approx((1 / 3, 2 / 3, 3))
    assert s.task_mcnemar(0) == (0, 2, 0.5)  # 2 · (½)² = 0.5
    assert s.task_mcnemar(1) == (0, 1, 1.0)  # 2 · ½ = 1
    # A third task where A wins once: b = 1, c = 3 → p = 2 · (C(4,0) + C(4,1)) / 2⁴ = 10/16; Δ = (2/3 + 1/3 − 1/2) / 3.
    # Its Δ = −1/2; the t interval over {2/3, 1/3, −1/2}: sd² = (1/4 + 1/36 + 4/9) / 2 = 13/36, half-width
    # t_{2, 0.975} · sd / √3 with t_{2, 0.975} = 4.30265.
    three = paired_success(_outcomes({**FLAGS_A, 2: [True, True]}, {**FLAGS_B, 2: [False, True]}), n_boot=2000)
    assert (three.b, three.c) == (1, 3) and three.p_mcnemar == pytest.approx(0.625, abs=1e-12)
    half = 4.302652729911275 * np.sqrt(13 / 36) / np.sqrt(3)
    assert three.diff == pytest.approx(1 / 6) and three.diff_ci == pytest.approx((1 / 6 - half, 1 / 6 + half))
    one = paired_success(_outcomes({0: FLAGS_A[0]}, {0: FLAGS_B[0]}))
    assert one.diff == pytest.approx(2 / 3) and np.isnan(one.diff_ci[0]) and "two tasks" in one.ci_note


# ---------------------------------------------------------------------------------------------------------------------
# Matching, on hand-made stores (manifests and episode attrs as the collection writes them; one record per episode)


def _manifest(preset) -> dict:
    config = preset.model_config
    return {
        "preset": preset.name,
        "checkpoint": f"random(seed={preset.param_seed})",
        "model_config": config.describe(),
        "suite": "libero_goal",
        "suffix_segment_names": list(config.suffix_segment_names),
        "condition": {"name": "baseline", "prompt_mode": "task", "intervention": None},
    }


def _attention(depth: int) -> np.ndarray:
    """attention_to_text [S=2, L, 1, heads=2, Ts=3] with every query putting mass l / depth on the text at layer l."""
    return np.broadcast_to((np.arange(depth) / depth)[None, :, None, None, None], (2, depth, 1, 2, 3)).astype(
        np.float32
    )


def _store(root: pathlib.Path, preset, flags, *, language=None, seed=7, init=None, error=None) -> pathlib.Path:
    """A store of `preset` with tasks / episodes / outcomes `flags`; `init(t, k)` the init state index; one record per
    episode with a planted attention to text (:func:`_attention`)."""
    record = {
        "t": 0,
        "actions": np.zeros((2, 7), np.float32),
        "attention_to_text": _attention(preset.model_config.depth),
        # The registry's attention_to_text reads the text content mass (BOS and the trailing newline left out).
        "attention_to_text_content": _attention(preset.model_config.depth),
        "denoise_times": np.array([1.0, 0.5], np.float32),
    }
    with store.LatentStoreWriter.create_or_open(root, _manifest(preset), resume=False) as writer:
        for t, outcomes in flags.items():
            lang = (language or {}).get(t, f"put the bowl {t} on the plate")
            task = {"task_id": t, "task_name": f"task_{t}", "suite": "libero_goal", "language": lang}
            for k, success in enumerate(outcomes):
                attrs = {"init_state_index": init(t, k) if init else k, "seed": seed, "prompt": lang, "max_steps": 10}
                ep = writer.begin_episode(task, k, {**attrs, "task_language": lang})
                ep.append_step(record)
                err = error if (error and (t, k) == error[0]) else None
                ep.finish({"success": bool(success), "total_steps": 10, "error": err and error[1]})
    return root


def test_matched_stores_pair_by_task_and_init_state(tmp_path):
    a = _store(tmp_path / "pi0", PI0, FLAGS_A)
    b = _store(tmp_path / "pi05", PI05, FLAGS_B, error=((1, 2), "env crashed"))
    m = match_collections(a, b, discrete_state_input=(None, False))
    assert (m.a.label, m.b.label) == ("pi0", "pi0.5") and (m.a.family, m.b.family) == ("pi0", "pi0.5")
    assert m.a.suffix_segments == ("state", "actions") and m.b.suffix_segments == ("action_0", "actions_1:")
    assert "never sees the robot state" in m.b.state_input and "state token" in m.a.state_input
    # task 1 episode 2 ended with an error in B: left out, with a note
    assert [(p.task_id, p.episode) for p in m.pairs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [(p.a, p.b) for p in m.pairs] == [(0, 1), (0, 1), (1, 1), (1, 1), (0, 1)]
    assert len(m.excluded) == 1 and "task 1 episode 2" in m.excluded[0] and "env crashed" in m.excluded[0]
    assert match_collections(a, b, task_ids=[1]).languages == {1: "put the bowl 1 on the plate"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 8}, r"task 0 episode 0 seed: 7 vs 8 — collect both with the same --seed"),
        ({"init": lambda t, k: k + 1}, r"task 1 episode 2 init_state_index: 2 vs 3 — .*--episodes-per-task"),
        ({"language": {1: "open the drawer"}}, r"task 1 language: 'put the bowl 1 on the plate' vs 'open the drawer'"),
        ({"flags": {0: [True] * 3}}, r"task ids: \[0, 1\] vs \[0\] — .*--task-ids 0"),
        ({"flags": {0: [True] * 3, 1: [True] * 2}}, r"task 1 episodes: \[0, 1, 2\] vs \[0, 1\] — .*--resume"),
        ({"preset": PI0}, r"both collections ran the same model .*--compare takes the other model's collection"),
    ],
)
def test_unmatched_stores_are_refused_naming_the_mismatch_and_the_fix(tmp_path, kwargs, message):
    a = _store(tmp_path / "a", PI0, FLAGS_A)
    preset, flags = kwargs.pop("preset", PI05), kwargs.pop("flags", FLAGS_B)
    b = _store(tmp_path / "b", preset, flags, **kwargs)
    with pytest.raises(CollectionMismatchError, match=message):
        match_collections(a, b)


def test_models_of_different_depths_are_drawn_at_relative_depth(tmp_path):
    from openpi.latents.analysis import analyze_collection
    from openpi.latents.analysis.compare.model_comparison import compare_models
    from openpi.latents.report.model_comparison import comparison_section

    full05 = presets.get_preset("pi05_libero")  # gemma_2b + gemma_300m: 18 layers, against the tiny pi0's 4
    a, b = _store(tmp_path / "pi0", PI0, FLAGS_A), _store(tmp_path / "pi05", full05, FLAGS_B)
    m = match_collections(a, b)
    assert (m.a.depth, m.b.depth) == (4, 18)
    res = [analyze_collection(p, embedding=None, probe=False, pooled=False, n_boot=100) for p in (a, b)]
    cmp = compare_models(m, *res, n_boot=100, compared=(("attention_to_text", "expert_1"),))
    assert cmp.x_axis == "relative depth"
    (row,) = cmp.layers
    assert row.a.x == (0, 0.25, 0.5, 0.75) and row.b.x == tuple(layer / 18 for layer in range(18))
    # The planted attention mass is l / depth: on the relative-depth axis both curves are y = x.
    for side in (row.a, row.b):
        np.testing.assert_allclose([c.estimate for c in side.values], side.x, atol=1e-6)
    assert row.paired == () and "depth 4 vs 18" in row.paired_reason
    text = "\n".join(comparison_section(cmp, tmp_path / "report"))
    assert "drawn at relative depth (layer / depth)" in text and "n/a (layers differ (depth 4 vs 18" in text


def test_a_second_model_is_found_among_condition_stores(tmp_path):
    a = _store(tmp_path / "runs" / "pi0", PI0, FLAGS_A)
    b = _store(tmp_path / "runs" / "pi05", PI05, FLAGS_B)
    found, same_model, theirs = MM.find_comparison(tmp_path / "runs", a)
    assert found == b and same_model == [a] and theirs == [b]
    assert MM.find_comparison(a, a) == (None, [a], [])  # one store, one model: nothing to compare
    # a directory of another model's stores alone stays a behaviour analysis of that model
    assert MM.find_comparison(tmp_path / "runs" / "pi05", a) == (None, [b], [])


# ---------------------------------------------------------------------------------------------------------------------
# End to end: two matched collections of the tiny presets, the CLI, report.md / metrics.json / figure


def _cli():
    script = pathlib.Path(__file__).parents[1] / "scripts" / "expert_language_analysis.py"
    spec = importlib.util.spec_from_file_location("ela", script)
    ela = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ela", ela)  # dataclasses look their module up there
    spec.loader.exec_module(ela)
    return ela


@pytest.fixture(scope="module")
def policies() -> dict:
    """The two tiny random-weight policies (2 denoising steps), shared by the synthetic and the LIBERO pair so that
    each model compiles once."""
    from openpi.policies import policy_config

    return {
        name: policy_config.create_trained_policy(preset.name, sample_kwargs={"num_steps": 2}, rng_seed=7)
        for name, preset in (("pi0", PI0), ("pi05", PI05))
    }


@pytest.fixture(scope="module")
def collections(policies, tmp_path_factory) -> dict[str, pathlib.Path]:
    from openpi.latents import synthetic_collection as sc
    from openpi.models.capture import CaptureSpec
    from openpi.training import control_organisms as co

    def observe(rng, prompt):
        obs = co.raw_observations(rng, 1)[0]
        del obs["prompt"]
        return obs

    root = tmp_path_factory.mktemp("pair")
    spec = sc.SyntheticCollection(co.PROMPTS[:2], n_episodes=3, n_steps=2, capture=CaptureSpec(), num_steps=2, seed=7)
    out = {}
    for name, flags in (("pi0", FLAGS_A), ("pi05", FLAGS_B)):
        known = iter(flags[t][k] for t in sorted(flags) for k in range(3))  # the judge runs task by task, in order
        out[name] = sc.collect_synthetic(
            policies[name], root / name, spec, observe, judge=lambda *_, known=known: next(known), progress=False
        )
    return out


@pytest.mark.slow
def test_report_gains_the_model_comparison_section(collections, tmp_path):
    # The known answer, read back from the stores' own success flags.
    for name, flags in (("pi0", FLAGS_A), ("pi05", FLAGS_B)):
        st = store.open_store(collections[name])
        assert {t: [st.episode(t, k).metadata["success"] for k in range(3)] for t in (0, 1)} == flags
    # The package path the CLI takes after its checks (the CLI itself: the LIBERO test below).
    from openpi.latents.analysis import analyze_collection
    from openpi.latents.analysis.compare.model_comparison import compare_models
    from openpi.latents.report import model_comparison as report_cmp
    from openpi.latents.report.json_report import clean

    matched = match_collections(collections["pi0"], collections["pi05"], discrete_state_input=(None, False))
    settings = dict(embedding=None, probe=False, n_boot=500, pooled=False)
    res_a, res_b = (analyze_collection(collections[n], **settings) for n in ("pi0", "pi05"))
    cmp = compare_models(matched, res_a, res_b, n_boot=500)
    out = tmp_path / "report"
    section = "\n".join(report_cmp.comparison_section(cmp, out))
    assert section.startswith("## Model comparison: pi0 vs pi0.5")
    # Paired success rows: task, language, episodes, A rate, B rate, Δ, b, c, McNemar p (values by hand, above).
    assert f"| 0 | {_prompt(0)} | 3 | 0.33 | 1.00 | 0.667 | 0 | 2 | 0.5000 |" in section
    assert f"| 1 | {_prompt(1)} | 3 | 0.33 | 0.67 | 0.333 | 0 | 1 | 1.0000 |" in section
    # t interval over the two per-task differences {1/3, 2/3}: 0.5 ± t_{1, 0.975} · (√2/6)/√2 = 0.5 ± 12.706/6
    assert "| all |  | 6 | 0.33 | 0.83 | 0.500 (mean over tasks) [-1.618, 2.618] | 0 | 3 | 0.2500 |" in section
    assert "*Statistics: unit of resampling task (t interval over tasks, K − 1 df" in section
    assert "2 tasks, 6 episodes" in section and "No state token in pi0.5" in section
    assert "never sees the robot state" in section and "adaptive RMSNorm" in section
    data = json.loads(json.dumps(clean(report_cmp.comparison_json(cmp)), allow_nan=False))  # as metrics.json holds it
    assert data["models"]["a"]["family"] == "pi0" and data["models"]["b"]["family"] == "pi0.5"
    overall = data["success"]["per_task"][-1]
    assert (overall["b"], overall["c"], overall["p_mcnemar"], overall["n_episodes"]) == (0, 3, 0.25, 6)
    assert data["layers"]["x_axis"] == "layer"  # both tiny presets: Gemma "dummy" experts of the same depth
    rows = {(r["metric"], r["stream"]): r for r in data["layers"]["per_metric"]}
    for key in [("prompt_sensitivity", s) for s in ("text_only", "expert_0", "expert_1")] + [
        ("attention_to_text", "expert_1"),
    ]:
        r = rows[key]
        assert r["a"]["per_layer"] is not None and r["b"]["per_layer"] is not None, key
        assert r["a"]["layers"] == r["b"]["layers"] and r["a"]["n_tasks"] == 2 and r["a"]["n_episodes"][0] == 6
        paired = r["paired_difference_b_minus_a"]
        assert paired["unit_of_resampling"] == "task" and paired["n_episodes"][0] == 6
    # Two prompts: every rerun of a task has the one other prompt, which the scene names, so decoding is refused
    decoding = rows[("prompt_decoding", "expert_0")]["a"]
    assert decoding["per_layer"] is None and "single rerun prompt" in decoding["reason"]
    # The paired difference is B's episode mean minus A's: check one layer against the two analyses' own values.
    r = rows[("prompt_sensitivity", "expert_1")]
    a_mean, b_mean = np.array(r["a"]["per_layer"]), np.array(r["b"]["per_layer"])
    np.testing.assert_allclose(r["paired_difference_b_minus_a"]["per_layer"], b_mean - a_mean, atol=1e-9)
    # Text decoding was not run (no embedding; it re-creates each random model's): both sides say why.
    assert (
        rows[("language_loss", "text_only")]["a"]["per_layer"] is None
        and rows[("language_loss", "text_only")]["a"]["reason"]
    )
    for name in ("model_comparison.png", "model_comparison_success.csv", "model_comparison_layers.csv"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "model_comparison_success.csv") as f:
        assert f.read().splitlines()[-1] == "all,,6,0.3333333333333333,0.8333333333333334,0.5,0,3,0.25"


def _prompt(t: int) -> str:
    from openpi.training import control_organisms as co

    return co.PROMPTS[t]


def test_cli_refuses_an_unmatched_pair_before_any_analysis(tmp_path, monkeypatch):
    a = _store(tmp_path / "a", PI0, FLAGS_A)
    b = _store(tmp_path / "b", PI05, FLAGS_B, seed=8)
    ela = _cli()

    def no_analysis(*args, **kwargs):
        raise AssertionError("the analysis ran before the comparison was checked")

    monkeypatch.setattr(ela.analysis, "analyze_collection", no_analysis)
    fix = r"(?s)not matched .*seed: 7 vs 8 — collect both with the same --seed"
    with pytest.raises(CollectionMismatchError, match=fix):
        ela.main(ela.Args(collection=str(a), compare=str(b), output_dir=tmp_path / "report"))


# ---------------------------------------------------------------------------------------------------------------------
# Real LIBERO: the tiny pi0 and pi0.5 on the same task and initial state, found among the stores of --conditions


@pytest.mark.libero
@pytest.mark.slow
def test_libero_pair_is_matched_and_compared(policies, tmp_path):
    from openpi.latents import collect as collection

    root = tmp_path / "runs"
    for name, preset in (("pi0", PI0), ("pi05", PI05)):
        args = collection.CollectionArgs(
            preset=preset.name, task_suite="libero_goal", task_ids=(0,), episodes_per_task=1, max_steps=10,
            num_denoise_steps=2, output_dir=root / name,
        )  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            collection.collect_conditions(args, policy=policies[name])
    a, b = (store.open_store(root / n).episode(0, 0) for n in ("pi0", "pi05"))
    # Paired: the same initial state and seed, hence the same first observation (after LIBERO's wait steps).
    assert a.metadata["seed"] == b.metadata["seed"] and a.metadata["init_state_index"] == 0
    np.testing.assert_array_equal(a.read("image")[0], b.read("image")[0])
    ela = _cli()
    out = tmp_path / "report"
    with contextlib.redirect_stdout(io.StringIO()):
        ela.main(ela.Args(collection=str(root / "pi0"), conditions=root, output_dir=out, text_decoding=False,
                          probe_shuffles=0, n_boot=50, pooled=False))  # fmt: skip
    text = (out / "report.md").read_text()
    assert "## Model comparison: pi0 vs pi0.5" in text and "## Behaviour under conditions" not in text
    ra, rb = (f"{float(m['success']):.2f}" for m in (a.metadata, b.metadata))
    b_, c_ = (
        int(a.metadata["success"] and not b.metadata["success"]),
        int(b.metadata["success"] and not a.metadata["success"]),
    )
    assert f"| all |  | 1 | {ra} | {rb} |" in text and f"| {b_} | {c_} |" in text
    assert "pi05_libero_tiny`): none: no state token" in text
    assert (out / "compare_pi0_5" / "report.md").stat().st_size > 0  # the compared collection's own report
    figure = json.loads((out / "metrics.json").read_text())["figures"]["model_comparison"]
    assert figure["panels"][0] == "paired success per task" and (out / figure["file"]).stat().st_size > 0
