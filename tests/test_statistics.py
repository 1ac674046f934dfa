"""Known-answer tests of the statistics of issue 10: within-task success comparison, task-cluster bootstrap, the
probe's permutation p-value, centred drift, the progress window, constant-token masks, float32 pooled captures and
teacher-forced counterfactual reruns. Synthetic data (and the tiny random pi0 for the model entry points); no LIBERO.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from openpi.latents.analysis import measures as M
from openpi.latents.analysis.measures.probe import task_probe
from openpi.latents.analysis.measures.probe_permutation import group_folds, ridge_permutation_test
from openpi.latents.analysis.run.result import progress_bins
from openpi.latents.analysis.stats import clustered as C


def _task_only(n_tasks=10, n_eps=50, seed=0):
    """A metric that depends only on the task; success rates differ by task (and correlate with the metric)."""
    rng = np.random.default_rng(seed)
    task_value = np.linspace(0, 1, n_tasks)
    tasks = np.repeat(np.arange(n_tasks), n_eps)
    p_success = np.linspace(0.1, 0.9, n_tasks)  # high-metric tasks succeed more often
    success = rng.uniform(size=len(tasks)) < p_success[tasks]
    return task_value[tasks], success, tasks


def test_task_only_metric_within_task_difference_contains_zero_pooled_does_not():
    v, f, c = _task_only()
    v = v + np.random.default_rng(1).normal(0, 0.01, len(v))  # a little episode noise
    pooled = C.pooled_split_by_task(v, f, c, n_boot=500)
    within = C.within_task_difference(v, f, c, n_boot=500, n_permutations=500)
    # pooled: a large gap with an interval far from 0 (the confound); within task: ~0, interval contains 0
    assert pooled.difference.estimate > 0.2 and pooled.difference.low > 0.1
    assert abs(within.difference.estimate) < 0.01
    assert within.difference.low <= 0.0 <= within.difference.high
    assert within.n_tasks_contributing == 10 and within.n_tasks == 10
    assert within.p_floor == pytest.approx(1 / 501) and within.difference.unit == "task"


def test_within_task_difference_exact_zero_counts_tasks_and_finds_a_planted_effect():
    v, f, c = _task_only(n_tasks=4, n_eps=6)
    f[c == 3] = True  # task 3: successes only -> cannot contribute
    w = C.within_task_difference(v, f, c, n_boot=200, n_permutations=200)
    assert w.difference.estimate == 0.0 and w.difference.low == 0.0 == w.difference.high and w.p_value == 1.0
    assert w.n_tasks == 4 and w.n_tasks_contributing == 3 and 3 not in w.per_task
    planted = v + 0.5 * f  # success adds 0.5 within every task
    w = C.within_task_difference(planted, f, c, n_boot=200, n_permutations=200)
    assert w.difference.estimate == pytest.approx(0.5) and w.p_value == pytest.approx(1 / 201)


def test_cluster_bootstrap_is_wider_than_the_episode_bootstrap_for_clustered_data():
    rng = np.random.default_rng(0)
    tasks = np.repeat(np.arange(10), 50)
    v = rng.normal(0, 1, 10)[tasks] + rng.normal(0, 0.3, len(tasks))  # shared per-task offset
    clustered = C.cluster_bootstrap_ci(v, tasks, n_boot=1000)
    naive = M.bootstrap_ci(v, n_boot=1000)
    assert clustered.estimate == pytest.approx(naive.estimate)
    assert (clustered.high - clustered.low) > 4 * (naive.high - naive.low)
    assert clustered.unit == "task" and clustered.n_clusters == 10 and clustered.n == 500
    one = C.cluster_bootstrap_ci(v[:50], tasks[:50], n_boot=100)  # one task: episodes resampled, and said
    assert one.unit == "episode" and one.n_clusters == 1 and one.low < one.estimate < one.high


def test_holm_by_hand():
    adj = C.holm([0.01, 0.04, 0.03, np.nan])
    np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])  # 3·0.01; max(2·0.03, 0.03); max(1·0.04, 0.06)
    assert np.isnan(adj[3])


def test_perfect_probe_p_value_at_the_defaults_and_the_floor():
    rng = np.random.default_rng(0)
    x, y, g = [], [], []
    for t in range(3):
        for e in range(4):
            x.append(rng.standard_normal((5, 8)) + 6 * np.eye(8)[t])
            y += [t] * 5
            g += [t * 4 + e] * 5
    res = task_probe(np.concatenate(x), np.array(y), np.array(g), n_shuffles=0)
    assert res.accuracy == 1.0 and res.p_value < 0.01
    assert res.n_permutations == 1000 and res.p_floor == pytest.approx(1 / 1001) == res.p_value


def test_ridge_permutation_null_is_calibrated_on_noise():
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(24), 5)
    y = g % 3
    ps = []
    for s in range(20):
        x = rng.standard_normal((len(g), 6))
        ps.append(ridge_permutation_test(x, y, g, group_folds(g, 4, s), n_permutations=200, seed=s).p_value)
    assert np.mean(np.array(ps) < 0.05) <= 0.15 and 0.3 < np.mean(ps) < 0.7


def test_centred_drift_recovers_a_change_hidden_by_a_shared_direction():
    rng = np.random.default_rng(0)
    W, P = 64, 8
    shared = np.zeros(W)
    shared[0] = 100.0  # a massive shared direction (Gemma's residual stream has a few)
    before = rng.standard_normal((P, W)) * 0.5
    before[:, 0] = 0
    after = rng.standard_normal((P, W)) * 0.5  # the content changes completely, orthogonally to `shared`
    after[:, 0] = 0
    states = shared + np.stack([before, after])  # [steps=2, P, W]
    uncentred = M.rollout_drift(states)[1]
    centred = M.centred_drift(states, shared)[1]
    # true per-token drift of the content: 1 − cos(before_p, after_p)
    truth = np.mean(1 - np.sum(before * after, -1) / np.linalg.norm(before, axis=-1) / np.linalg.norm(after, axis=-1))
    assert uncentred < 0.01 and centred == pytest.approx(truth, rel=1e-9) and centred > 0.5
    assert M.centred_drift(np.stack([states[0], states[0]]), shared)[1] == 0.0


def test_progress_bins_never_collapse_and_a_one_step_episode_gives_no_nan():
    one = progress_bins(np.array([[2.0]]), 10)
    np.testing.assert_array_equal(one[:, 0], 2.0)
    v = np.arange(4.0)[:, None]  # steps cover [0, .25), [.25, .5), ...; 2 bins -> means of (0, 1) and (2, 3)
    np.testing.assert_allclose(progress_bins(v, 2)[:, 0], [0.5, 2.5])
    assert progress_bins(v, 10).mean() == pytest.approx(v.mean())


def test_one_step_episode_success_split_has_no_nan(tmp_path):
    from test_analysis import BF16, STREAMS, Synth, build_store, drift_patterns

    from openpi.latents import analysis as A

    syn = Synth()
    patterns = drift_patterns(syn.W)

    def rec(t, k, i):
        r = syn.record(t, k, i)
        r["expert_1_segment_means"] = np.broadcast_to(patterns[i], (syn.S, syn.L, 1, 2, syn.W)).astype(BF16)
        return r

    root = build_store(
        tmp_path / "s", rec, tasks=(0, 1), episodes=3, steps=lambda t, k: 1 if (t, k) == (0, 0) else 4,
        success=lambda t, k: k < 2,  # the 1-step episode (a success) has no drift; task 0 keeps another success
    )  # fmt: skip
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=50, n_permutations=50)
    for s in STREAMS:
        for m in ("drift", "centred_drift"):
            pooled, within = res.success_split(s, m), res.within_task_split(s, m)
            assert not np.any(np.isnan([x.difference.estimate for x in pooled])), (s, m)
            assert not np.any(np.isnan([x.difference.estimate for x in within])), (s, m)
            assert all(x.n_tasks_contributing == 2 for x in within)
        grid, counts = res.heatmap_progress(s, "drift")
        assert not np.any(np.isnan(grid)) and counts.max() == 5  # the 1-step episode has no drift after step 0
        assert res.heatmap_progress(s, "centred_drift")[1].min() == 5


def test_informative_text_mask_drops_bos_and_trailing_newline():
    m = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(
        M.informative_text_mask(m), [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    )


# --------------------------------------------------------------------------------------------------------------------
# Model entry points (the tiny random pi0)


@pytest.fixture(scope="module")
def tiny():
    from model_inputs import random_observation

    from openpi.models import pi0

    cfg = pi0.Pi0Config(
        dtype="float32", paligemma_variant="dummy", action_expert_variant="dummy", siglip_variant="mu/14",
        vocab_size=1024,
    )  # fmt: skip
    model = cfg.create(jax.random.key(1))
    obs = random_observation(cfg, 1, seed=3)
    noise = np.random.default_rng(4).normal(size=(1, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return model, obs, noise


def test_teacher_forced_rerun_has_zero_expert1_layer0_sensitivity(tiny):
    from openpi.models.capture import CaptureSpec

    model, obs, noise = tiny
    spec = CaptureSpec(expert_0="off", expert_1="full", trajectory=True, dtype="float32")
    base = jax.tree.map(np.asarray, model.infer_with_latents(jax.random.key(0), obs, num_steps=4, noise=noise,
                                                             capture=spec))  # fmt: skip
    ids = np.asarray(obs.tokenized_prompt)
    other = dataclasses.replace(obs, tokenized_prompt=jax.numpy.asarray((ids * 7 + 5) % 1000))
    free = jax.tree.map(np.asarray, model.infer_with_latents(jax.random.key(0), other, num_steps=4, noise=noise,
                                                             capture=spec))  # fmt: skip
    forced = jax.tree.map(
        np.asarray,
        model.infer_with_latents(
            jax.random.key(0), other, num_steps=4, noise=noise, capture=spec, x_t_sequence=base["x_t"][:4]
        ),
    )
    e1 = "expert_1_hidden_states"  # [S, L, B, Ts, W]
    sens_forced = [M.prompt_sensitivity(base[e1][s, 0], forced[e1][s, 0], keep_axes=()) for s in range(4)]
    sens_free = [M.prompt_sensitivity(base[e1][s, 0], free[e1][s, 0], keep_axes=()) for s in range(4)]
    assert sens_forced == [0.0] * 4  # exactly: layer 0 is the embedded (state, x_t, t), prompt-free
    assert sens_free[0] == 0.0 and min(sens_free[1:]) > 0  # trajectory divergence after step 0
    assert M.prompt_sensitivity(base[e1][:, -1], forced[e1][:, -1], keep_axes=()) > 0  # the prompt still acts
    np.testing.assert_array_equal(forced["x_t"][:4], base["x_t"][:4])
    # feeding a run its own trajectory reproduces it bit for bit
    own = model.infer_with_latents(jax.random.key(0), obs, num_steps=4, noise=noise, capture=spec,
                                   x_t_sequence=base["x_t"][:4])  # fmt: skip
    np.testing.assert_array_equal(np.asarray(own["actions"]), base["actions"])
    with pytest.raises(ValueError, match="x_t_sequence"):
        model.sample_actions(jax.random.key(0), obs, num_steps=4, noise=noise, x_t_sequence=base["x_t"])


def test_pooled_captures_are_float32_and_resolve_a_1e5_relative_change(tiny):
    from openpi.models.capture import CaptureSpec

    model, obs, noise = tiny
    pooled = CaptureSpec(expert_0="pooled", expert_1="pooled", dtype="bfloat16")
    full = CaptureSpec(expert_0="off", expert_1="full", dtype="float32")
    noise2 = noise * np.float32(1 + 1e-5)

    def run(spec, n):
        return jax.tree.map(np.asarray, model.infer_with_latents(jax.random.key(0), obs, num_steps=2, noise=n,
                                                                 capture=spec))  # fmt: skip

    a, b = run(pooled, noise), run(pooled, noise2)
    assert a["expert_0_segment_means"].dtype == np.float32 and a["expert_1_segment_means"].dtype == np.float32
    fa, fb = run(full, noise)["expert_1_hidden_states"], run(full, noise2)["expert_1_hidden_states"]
    # the true relative change of the action-token mean at layer 0, step 0 (float64 from the float32 capture)
    ta, tb = fa[0, 0, :, 1:].astype(np.float64).mean(-2), fb[0, 0, :, 1:].astype(np.float64).mean(-2)
    truth = np.linalg.norm(ta - tb) / np.linalg.norm(ta)
    got = M.prompt_sensitivity(a["expert_1_segment_means"][0, 0, :, 1], b["expert_1_segment_means"][0, 0, :, 1],
                               keep_axes=())  # fmt: skip
    assert 1e-6 < truth < 1e-4 and truth / 3 < got < truth * 3
