"""Known-answer tests for openpi.latents.analysis.measures / stats (small synthetic data, no model, fast)."""

import math

import ml_dtypes
import numpy as np
import pytest
from scipy import special

from openpi.latents.analysis import measures as metrics

BF16 = ml_dtypes.bfloat16


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------------------------
# helpers


def test_text_positions_and_masked_mean():
    mask = np.array([[True, True, False], [True, False, False]])
    b, t = metrics.text_positions(mask)
    np.testing.assert_array_equal(b, [0, 0, 1])
    np.testing.assert_array_equal(t, [0, 1, 0])
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [B, T, W]
    out = metrics.masked_mean(x, mask)
    np.testing.assert_allclose(out, [[1.0, 2.0], [6.0, 7.0]])
    assert np.isnan(metrics.masked_mean(x, np.zeros_like(mask))).all()


# --------------------------------------------------------------------------------------------------------------------
# 1. text reconstruction


def _layer0_case(vocab=517, width=64, batch=2, t=12, layers=3, seed=0):
    rng = _rng(seed)
    emb = rng.normal(size=(vocab, width)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(batch, t))
    mask = np.ones((batch, t), bool)
    mask[0, 9:] = False
    mask[1, 5:] = False
    ids[~mask] = 0  # padding id, as the tokenizer does
    hidden = rng.normal(size=(layers, batch, t, width)).astype(np.float32)
    # Layer 0 of the text stream is embed(ids) = E[ids] * sqrt(W), cast to the compute dtype (bf16).
    hidden[0] = (emb[ids] * np.float32(math.sqrt(width))).astype(BF16).astype(np.float32)
    return emb, ids, mask, hidden.astype(BF16)


def test_text_reconstruction_layer0_exact():
    emb, ids, mask, hidden = _layer0_case()
    res = metrics.text_reconstruction(hidden, ids, mask, emb, chunk=100, keep_axes=0)
    assert res.accuracy[0] == 1.0 and res.language_loss[0] == 0.0
    np.testing.assert_array_equal(res.n_valid, [14, 14, 14])
    np.testing.assert_array_equal(res.predicted_ids[0][mask], ids[mask])
    assert (res.predicted_ids[:, ~mask] == -1).all()
    assert not res.correct[:, ~mask].any()
    np.testing.assert_allclose(res.true_cosine[0][mask], 1.0, atol=1e-2)
    assert np.isnan(res.true_cosine[:, ~mask]).all()
    # Chunk size does not change the answer (global argmax, lowest id on ties).
    res2 = metrics.text_reconstruction(hidden, ids, mask, emb, chunk=4096, keep_axes=0)
    np.testing.assert_array_equal(res.predicted_ids, res2.predicted_ids)
    # Single summary by default.
    res3 = metrics.text_reconstruction(hidden[:1], ids, mask, emb)
    assert res3.accuracy == 1.0 and res3.n_valid == 14 and isinstance(res3.accuracy, float)


def test_text_reconstruction_random_is_chance():
    # N random states, V random embeddings: #correct ~ Binomial(N, 1/V), mean N/V = 6 here. A Chernoff bound gives
    # P(#correct >= 5·N/V = 30) <= exp(-N/V · (5 ln 5 - 4)) = exp(-6 · 4.05) < 1e-10, so accuracy < 5/V is safe.
    rng = _rng(1)
    vocab, width, n = 500, 32, 3000
    emb = rng.normal(size=(vocab, width))
    ids = rng.integers(0, vocab, size=n)
    hidden = rng.normal(size=(n, width))
    res = metrics.text_reconstruction(hidden, ids, None, emb, chunk=128)
    assert res.n_valid == n
    assert res.accuracy < 5 / vocab
    assert math.isclose(res.language_loss, 1 - res.accuracy)


def test_text_reconstruction_zero_state_and_zero_row():
    emb = np.eye(4, dtype=np.float32)
    emb[3] = 0.0  # a zero embedding row never wins
    hidden = np.array([[0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0]], np.float32)
    res = metrics.text_reconstruction(hidden, np.array([0, 3, 1]), None, emb)
    np.testing.assert_array_equal(res.predicted_ids, [-1, 0, 1])  # zero state -> -1; all-negative: tie -> lowest id
    assert math.isclose(res.accuracy, 1 / 3)


def test_text_reconstruction_rejects_bad_ids():
    with pytest.raises(ValueError):
        metrics.text_reconstruction(np.ones((2, 3)), np.array([0, 7]), None, np.ones((5, 3)))


# --------------------------------------------------------------------------------------------------------------------
# 1b. logit lens


def test_logit_lens_matches_log_softmax():
    rng = _rng(2)
    vocab, width = 7, 5
    emb = rng.normal(size=(vocab, width))
    scale = rng.normal(size=width) * 0.3
    hidden = rng.normal(size=(2, 4, width)) * 3.0
    ids = rng.integers(0, vocab, size=(2, 4))
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    res = metrics.logit_lens(hidden, ids, mask, emb, scale, chunk=3, keep_axes=0)

    normed = hidden / np.sqrt(np.mean(hidden**2, -1, keepdims=True) + 1e-6) * (1 + scale)
    logits = normed @ emb.T
    logp = special.log_softmax(logits, axis=-1)
    nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    true_z = np.take_along_axis(logits, ids[..., None], -1)
    rank = (logits > true_z).sum(-1)
    np.testing.assert_allclose(res.nll[mask], nll[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.rank[mask], rank[mask])
    assert np.isnan(res.nll[~mask]).all() and (res.rank[~mask] == -1).all()
    np.testing.assert_allclose(res.mean_nll, [nll[0, :3].mean(), nll[1, :2].mean()], rtol=1e-5)
    np.testing.assert_allclose(res.median_rank, [np.median(rank[0, :3]), np.median(rank[1, :2])])
    np.testing.assert_array_equal(res.n_valid, [3, 2])


def test_logit_lens_by_hand():
    # E = I (V = W = 4), scale = 0, eps = 0, h = 3·e_k: RMSNorm gives 3/sqrt(9/4)·e_k = 2·e_k, so the logits are 2 at
    # k and 0 elsewhere: NLL = log(e² + 3) − 2 and rank 0.
    emb = np.eye(4)
    hidden = 3.0 * np.eye(4)[[1, 2]]
    res = metrics.logit_lens(hidden, np.array([1, 2]), None, emb, np.zeros(4), eps=0.0)
    np.testing.assert_allclose(res.nll, math.log(math.e**2 + 3) - 2, rtol=1e-6)
    np.testing.assert_array_equal(res.rank, [0, 0])
    assert res.top1 == 1.0 and res.mean_rank == 0.0
    # The wrong label under the same state: logit 0 against one logit of 2 -> rank 1, NLL = log(e² + 3).
    res = metrics.logit_lens(hidden, np.array([0, 0]), None, emb, np.zeros(4), eps=0.0)
    np.testing.assert_array_equal(res.rank, [1, 1])
    np.testing.assert_allclose(res.nll, math.log(math.e**2 + 3), rtol=1e-6)


def test_logit_lens_aligned_row_is_rank0():
    rng = _rng(3)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # equal norms: the aligned row has the strictly largest logit
    ids = np.array([5, 77, 299])
    hidden = (emb[ids] * 10).astype(BF16)
    res = metrics.logit_lens(hidden, ids, None, emb, np.zeros(16, np.float32), chunk=64)
    np.testing.assert_array_equal(res.rank, [0, 0, 0])
    assert np.all(res.nll > 0) and np.all(np.isfinite(res.nll))


# --------------------------------------------------------------------------------------------------------------------
# 2. prompt sensitivity and action divergence


def test_prompt_sensitivity_known_answers():
    rng = _rng(4)
    a = rng.normal(size=(3, 2, 6, 8)).astype(BF16)  # [L, B, T, W]
    np.testing.assert_array_equal(metrics.prompt_sensitivity(a, a.copy()), np.zeros(3))
    np.testing.assert_array_equal(metrics.prompt_sensitivity(a, (a.astype(np.float32) * 2)), np.ones(3))
    assert metrics.prompt_sensitivity(a, 2 * a.astype(np.float32), keep_axes=None) == 1.0
    # Changes at invalid positions are ignored.
    mask = np.ones((2, 6), bool)
    mask[:, 4:] = False
    b = a.astype(np.float32).copy()
    b[:, :, 4:] += 100
    np.testing.assert_array_equal(metrics.prompt_sensitivity(a, b, mask=mask), np.zeros(3))
    assert np.all(metrics.prompt_sensitivity(a, b) > 0)
    # Hand case: a = (3, 4), b = (0, 0) -> 5 / 5 = 1; b = (3, 0) -> 4 / 5.
    assert metrics.prompt_sensitivity(np.array([[3.0, 4.0]]), np.array([[3.0, 0.0]]))[0] == pytest.approx(0.8)
    # [S, L, ...] with keep_axes=(0, 1); ‖a‖ = 0 -> NaN.
    z = np.zeros((2, 3, 4, 5))
    out = metrics.prompt_sensitivity(z, z + 1, keep_axes=(0, 1))
    assert out.shape == (2, 3) and np.isnan(out).all()


def test_action_divergence():
    a = np.zeros((2, 3))
    b = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    d = metrics.action_divergence(a, b)
    assert d.mean_l2 == 2.5 and d.max_abs == 4.0
    d0 = metrics.action_divergence(b, b)
    assert d0.mean_l2 == 0.0 and d0.max_abs == 0.0
    batched = metrics.action_divergence(np.stack([a, b]), np.stack([b, b]))
    np.testing.assert_array_equal(batched.mean_l2, [2.5, 0.0])


# --------------------------------------------------------------------------------------------------------------------
# 3. task probe


def _probe_data(signal: float, n_classes=4, eps_per_class=8, steps=10, d=16, episode_offset=0.0, seed=5):
    rng = _rng(seed)
    directions = rng.normal(size=(n_classes, d))
    x, y, g = [], [], []
    for c in range(n_classes):
        for e in range(eps_per_class):
            off = rng.normal(size=d) * episode_offset
            x.append(signal * directions[c] + off + rng.normal(size=(steps, d)))
            y += [c] * steps
            g += [c * eps_per_class + e] * steps
    return np.concatenate(x), np.array(y), np.array(g)


def test_task_probe_planted_signal():
    x, y, g = _probe_data(signal=3.0)
    res = metrics.task_probe(x, y, g, n_splits=4, n_shuffles=8, seed=0)
    assert res.reason is None and res.n_splits == 4 and res.n_classes == 4 and res.n_groups == 32
    assert res.accuracy > 0.95
    assert res.accuracy_ci[0] <= res.accuracy <= res.accuracy_ci[1]
    assert res.chance_uniform == 0.25 and res.chance_majority == 0.25
    # The shuffled control sits near chance and far below the real accuracy.
    assert len(res.shuffled_accuracies) == 8
    assert res.shuffled_ci[0] <= res.shuffled_mean <= res.shuffled_ci[1]
    assert abs(res.shuffled_mean - 0.25) < 0.15
    assert res.shuffled_ci[1] < res.accuracy
    # The logistic shuffles' p-value floors at 1/(1 + 8); p_value (definition changed, issue 10) comes from the
    # ridge permutation test with 1000 permutations, whose floor 1/1001 a planted signal reaches.
    assert res.shuffled_p_value == pytest.approx(1 / 9)
    assert res.p_value == pytest.approx(1 / 1001) == res.p_floor and res.p_value_test == "ridge permutation"


def test_task_probe_noise_with_episode_structure_is_chance():
    # No class signal but a strong per-episode offset: a probe that let an episode into both train and test could
    # memorize episode -> label. Grouped folds keep it at chance (0.25).
    x, y, g = _probe_data(signal=0.0, episode_offset=5.0)
    res = metrics.task_probe(x, y, g, n_splits=4, n_shuffles=2)
    assert res.accuracy < 0.5
    # The data does leak when every sample is its own group (this is what the grouping prevents).
    assert metrics.task_probe(x, y, np.arange(len(y)), n_splits=4, n_shuffles=0).accuracy > 0.7
    # Deterministic given the seed.
    again = metrics.task_probe(x, y, g, n_splits=4, n_shuffles=2)
    np.testing.assert_array_equal(res.fold_accuracies, again.fold_accuracies)
    np.testing.assert_array_equal(res.shuffled_accuracies, again.shuffled_accuracies)


def test_task_probe_degenerate():
    x = _rng().normal(size=(12, 3))
    res = metrics.task_probe(x, np.zeros(12, int), np.arange(12) // 3)
    assert math.isnan(res.accuracy) and "class" in res.reason
    res = metrics.task_probe(x, np.arange(12) % 2, np.zeros(12, int))
    assert math.isnan(res.accuracy) and "group" in res.reason
    # 3 groups (one label each would leave a class out of training); labels vary inside groups here.
    y = np.arange(12) % 2
    res = metrics.task_probe(x, y, np.arange(12) // 4, n_splits=5, n_shuffles=2)
    assert res.n_splits == 3 and any("reduced" in n for n in res.notes)
    assert any("more than one label" in n for n in res.notes) and math.isnan(res.shuffled_mean)
    assert 0.0 <= res.accuracy <= 1.0
    # 2 classes x 3 episodes x 1 step: 6 groups allow 5 folds, but each class has 3 samples, so at most 3 folds
    # (sklearn refuses more); one sample per class leaves nothing to hold out.
    x6, y6, g6 = _rng(1).normal(size=(6, 3)), np.repeat([0, 1], 3), np.arange(6)
    res = metrics.task_probe(x6, y6, g6, n_splits=5, n_shuffles=0, n_permutations=0)
    assert res.reason is None and res.n_splits == 3
    assert any("largest class has 3 samples" in n for n in res.notes)
    res = metrics.task_probe(x6[:2], np.array([0, 1]), np.arange(2), n_splits=5, n_shuffles=0, n_permutations=0)
    assert math.isnan(res.accuracy) and "one sample per class" in res.reason


# --------------------------------------------------------------------------------------------------------------------
# 4. drift


def test_rollout_drift_known_answers():
    e = np.eye(3)
    states = np.stack([e[0], e[0], e[1], -e[0], e[0] + e[1]])  # [steps, W]
    np.testing.assert_allclose(metrics.rollout_drift(states), [0, 0, 1, 2, 1 - 1 / math.sqrt(2)], atol=1e-15)
    # Identical steps give exactly 0 (bf16, many features, layer axis kept).
    x = _rng(6).normal(size=(1, 4, 2, 7, 32)).astype(BF16)  # [steps, L, B, T, W]
    same = np.repeat(x, 5, axis=0)
    out = metrics.rollout_drift(same, keep_axes=1)
    assert out.shape == (5, 4) and (out == 0).all()
    # Differences only at invalid positions are ignored; at valid ones they count.
    mask = np.ones((2, 7), bool)
    mask[:, 5:] = False
    moved = same.astype(np.float32)
    moved[2, :, :, 5:] += 3.0
    np.testing.assert_array_equal(metrics.rollout_drift(moved, mask=mask, keep_axes=1), np.zeros((5, 4)))
    assert (metrics.rollout_drift(moved, keep_axes=1)[2] > 0).all()
    # Zero state -> NaN.
    assert np.isnan(metrics.rollout_drift(np.stack([e[0], 0 * e[0]]))[1])
    with pytest.raises(ValueError):
        metrics.rollout_drift(states, keep_axes=0)


# --------------------------------------------------------------------------------------------------------------------
# 5. attention


def test_attention_mass_onto_keys_by_hand():
    logits = np.log(np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))  # [T=2, S=4]
    probs = special.softmax(logits, axis=-1)  # rows [1, 2, 3, 4] / 10 and [4, 3, 2, 1] / 10
    keys = np.array([True, False, True, False])
    np.testing.assert_allclose(metrics.attention_mass_onto_keys(probs, keys), [0.4, 0.6])
    np.testing.assert_allclose(metrics.attention_mass_onto_keys(probs, np.ones(4, bool)), [1.0, 1.0])
    np.testing.assert_array_equal(metrics.attention_mass_onto_keys(probs, np.zeros(4, bool)), [0.0, 0.0])
    # Batched [B, heads, T, S] with a per-batch key mask [B, 1, S]; bf16 probabilities; values in [0, 1].
    rng = _rng(7)
    p = special.softmax(rng.normal(size=(2, 3, 5, 9)), axis=-1).astype(BF16)
    km = rng.random(size=(2, 1, 9)) < 0.5
    out = metrics.attention_mass_onto_keys(p, km)
    assert out.shape == (2, 3, 5) and out.dtype == np.float32
    assert np.all(out >= 0) and np.all(out <= 1 + 1e-2)
    ref = (p.astype(np.float64) * km[..., None, :]).sum(-1)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_attention_to_language_summary():
    s, n_l, b, h, ts = 2, 3, 1, 2, 4
    a = np.zeros((s, n_l, b, h, ts), np.float32)
    a[..., 0] = 0.5  # the state token: the same at every denoising step
    act = np.array([0.1, 0.2, 0.3])
    a[..., 1:] = act[None, :, None, None, None]  # action tokens: 0.1·(layer + 1)
    a[1, ..., 1:] += 0.2  # second denoising step
    a[..., 1, :] *= 3  # head 1 three times head 0
    r = metrics.attention_to_language(a)
    heads = np.array([1.0, 3.0])
    np.testing.assert_allclose(r.state, [0.5 * heads.mean()] * 3)
    assert r.state_step_spread == 0.0
    np.testing.assert_allclose(r.actions, [act * heads.mean(), (act + 0.2) * heads.mean()], rtol=1e-6)
    per_head = (0.5 + 3 * (act + 0.1))[:, None] / 4 * heads[None]  # [L, heads]: mean over steps and queries
    np.testing.assert_allclose(r.per_head, per_head, rtol=1e-6)
    np.testing.assert_allclose(r.per_layer, per_head.mean(1), rtol=1e-6)
    assert r.overall == pytest.approx(per_head.mean())
    # pi0.5: no state token, every query an action query.
    r5 = metrics.attention_to_language(a, state_query=False)
    assert np.all(np.isnan(r5.state)) and np.isnan(r5.state_step_spread)
    np.testing.assert_allclose(r5.actions[0], (0.5 + 3 * act) / 4 * heads.mean(), rtol=1e-6)
    # A state query that moves between steps shows in the spread.
    a[1, ..., 0] += 0.25
    assert metrics.attention_to_language(a).state_step_spread == pytest.approx(0.25)


def test_normalised_attention_by_hand():
    from openpi.latents.analysis.measures import attention

    # [visible, text, text_content, bos] keys of three queries: a normal one, one with no content key, one with none.
    counts = np.array([[10, 5, 3, 1], [8, 2, 0, 1], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(attention.key_share(counts, "text_content"), [0.3, 0.0, np.nan])
    np.testing.assert_allclose(attention.key_share(counts, "bos"), [0.1, 0.125, np.nan])
    mass = np.array([[0.3, 0.0, 0.5], [0.6, 0.1, 0.5]])  # [steps, queries]
    norm = attention.normalised_mass(mass, counts, "text_content")
    np.testing.assert_allclose(norm, [[1.0, np.nan, np.nan], [2.0, np.nan, np.nan]])  # uniform = 1
    with pytest.raises(ValueError, match="4 groups"):
        attention.key_share(counts[:, :3], "text")


# --------------------------------------------------------------------------------------------------------------------
# 6. bootstrap and success split


def test_bootstrap_ci():
    c = metrics.bootstrap_ci(np.full(50, 0.3))
    assert c.low == c.high == c.estimate and c.n == 50
    rng = _rng(8)
    v = rng.normal(loc=2.0, scale=1.0, size=400)
    ci = metrics.bootstrap_ci(v, seed=1)
    assert ci.low < 2.0 < ci.high
    # The percentile interval of a mean approaches ±1.96·sd/sqrt(n).
    assert (ci.high - ci.low) == pytest.approx(2 * 1.96 * v.std() / 20, rel=0.15)
    assert metrics.bootstrap_ci(v, seed=1) == ci
    # NaNs dropped; fewer than two values -> NaN interval; statistic without an axis argument still works.
    one = metrics.bootstrap_ci(np.array([np.nan, 3.0]))
    assert one.estimate == 3.0 and one.n == 1 and math.isnan(one.low)
    med = metrics.bootstrap_ci(v, statistic=lambda x: float(np.percentile(x, 50)), n_boot=200)
    assert med.low < med.estimate < med.high


def test_split_by_success():
    rng = _rng(9)
    vals = np.concatenate([rng.normal(1.0, 0.1, 20), rng.normal(0.0, 0.1, 20)])
    flags = np.arange(40) < 20
    r = metrics.split_by_success(vals, flags)
    assert r.n_success == 20 and r.n_failure == 20
    assert r.difference.estimate == pytest.approx(1.0, abs=0.1)
    assert r.difference.excludes_zero() and r.difference.low > 0.8
    assert r.success.low < r.success.estimate < r.success.high
    # Same distribution on both sides: the difference interval covers 0.
    same = metrics.split_by_success(rng.normal(0, 1, 40), flags)
    assert not same.difference.excludes_zero()
    # No failed episode -> NaN difference.
    none = metrics.split_by_success(vals[:20], np.ones(20, bool))
    assert none.n_failure == 0 and math.isnan(none.difference.estimate) and math.isnan(none.failure.low)
