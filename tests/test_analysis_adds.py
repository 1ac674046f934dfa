"""Known-answer tests of the analyses added for issue 10: geometry (linear CKA, effective rank), the token-identity
probe with its control task, the tuned lens, the control-model comparison, and the final-norm capture they read.

Synthetic data whose answer follows from construction (no LIBERO); the capture test runs the upstream fixture model
(tests/data/pi0_tiny_a) in float32.
"""

import dataclasses

import jax
import numpy as np
import pytest
from model_inputs import fixture_observation, tiny_a_config

from openpi.models import model as _model
from openpi.models.capture import CaptureSpec

# --------------------------------------------------------------------------------------------------------------------
# The final-norm capture (CaptureSpec.final_norm)


@pytest.fixture(scope="module")
def tiny_a(tiny_a_dir, tiny_a_inputs):
    params = _model.restore_params(tiny_a_dir / "checkpoint" / "params", restore_type=np.ndarray)
    return tiny_a_config().load(params), fixture_observation(tiny_a_inputs), tiny_a_inputs["noise"]


def _last_layer_output(model, obs) -> np.ndarray:
    """Expert 0's last-layer output over the prefix: the input of its final-norm module, recorded by a flax method
    interceptor on a plain forward pass (an independent route from the CaptureSpec code)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from openpi.models.pi0 import make_attn_mask

    seen = []

    def record(next_fun, args, kwargs, context):
        if context.module.name == "final_norm" and context.method_name == "__call__":
            seen.append(np.asarray(args[0], np.float64))
        return next_fun(*args, **kwargs)

    o = _model.preprocess_observation(None, obs, train=False)
    tokens, mask, ar = model.embed_prefix(o)
    with nn.intercept_methods(record):
        model.config.llm((), "float32").apply(
            {"params": model.params["PaliGemma"]["llm"]},
            [tokens, None],
            jnp.cumsum(mask, axis=1) - 1,
            make_attn_mask(mask, ar),
        )
    assert len(seen) == 1
    return seen[0]


@pytest.mark.slow
def test_final_norm_capture_is_the_final_norm_of_the_last_layer(tiny_a):
    model, obs, noise = tiny_a
    cfg = model.config
    spec = CaptureSpec(expert_0="off", expert_1="off", attention_to_text=False, final_norm=True, dtype="float32")
    out = jax.tree.map(
        np.asarray, model.infer_with_latents(jax.random.key(0), obs, num_steps=3, noise=noise, capture=spec)
    )
    got = out["text_only_final_norm"]
    assert got.shape == (obs.state.shape[0], cfg.max_token_len, cfg.paligemma_config.width)
    h = _last_layer_output(model, obs)[:, cfg.text_start : cfg.prefix_len]
    scale = np.asarray(model.params["PaliGemma"]["llm"]["final_norm"]["scale"], np.float64)
    want = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # it is not just the last captured residual entry (the stream entering the last layer) renormalised
    last_in = out["text_only_hidden_states"][-1].astype(np.float64)
    assert np.abs(last_in / np.sqrt(np.mean(last_in**2, -1, keepdims=True)) * (1 + scale) - want).max() > 1e-3


@pytest.mark.slow
def test_final_norm_capture_never_changes_actions(tiny_a):
    model, obs, noise = tiny_a
    plain = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=3, noise=noise))
    spec = dataclasses.replace(CaptureSpec.off(), final_norm=True)  # the capture alone: the smallest program
    assert not spec.is_off
    out = model.infer_with_latents(jax.random.key(0), obs, num_steps=3, noise=noise, capture=spec)
    assert np.array_equal(plain, np.asarray(out["actions"]))  # bit-identical, not just close
    assert "text_only_final_norm" in out
    assert "text_only_final_norm" not in model.infer_with_latents(
        jax.random.key(0), obs, num_steps=3, noise=noise, capture=CaptureSpec.off()
    )


# --------------------------------------------------------------------------------------------------------------------
# Geometry: linear CKA and effective rank

from openpi.latents.analysis.measures import geometry as G  # noqa: E402
from openpi.latents.analysis.measures import token_probe as TP  # noqa: E402


def _orthogonal(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_known_answers(debiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))  # anisotropic
    cka = lambda a, b: G.linear_cka(a, b, debiased=debiased)  # noqa: E731
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    # orthogonal transform, isotropic scale and a shift of every row leave CKA at 1
    assert cka(x, 3.0 * x @ _orthogonal(32, rng) + 5.0) == pytest.approx(1.0, abs=1e-9)
    # a representation of other width holding the same information up to rotation
    assert cka(x, np.concatenate([x @ _orthogonal(32, rng), np.zeros((400, 8))], 1)) == pytest.approx(1.0, abs=1e-9)
    # independent noise: ~0 (the plain estimator's bias is ~D/N = 0.08 here; the debiased one is unbiased)
    noise = rng.normal(size=(400, 32))
    assert abs(cka(x, noise)) < (0.02 if debiased else 0.15)
    # a non-isotropic linear map is not invariant: CKA strictly between the two
    assert 0.1 < cka(x, x * np.linspace(0.05, 3, 32)) < 0.99


def test_debiased_cka_is_near_zero_where_the_plain_estimator_is_not():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 600)), rng.normal(size=(300, 600))  # width 2x the samples (as W=2048, N=1000)
    assert G.linear_cka(x, y, debiased=False) > 0.5  # the bias the module docstring warns about
    assert abs(G.linear_cka(x, y)) < 0.02


def test_cka_grams_match_direct_and_refuse_mismatched_samples():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 5))
    assert G.cka_from_grams(G.gram(x), G.gram(y)) == pytest.approx(G.linear_cka(x, y), abs=1e-12)
    with pytest.raises(ValueError, match="same samples"):
        G.linear_cka(x, y[:40])
    assert np.isnan(G.linear_cka(x, np.ones((50, 3))))  # a constant representation has no self-similarity


@pytest.mark.parametrize("k", [1, 3, 10])
def test_effective_rank_of_a_rank_k_isotropic_cloud_is_k(k):
    rng = np.random.default_rng(k)
    # exactly isotropic: orthonormal columns orthogonal to the all-ones vector (so centring keeps them), rotated
    a = np.concatenate([np.ones((200, 1)), rng.normal(size=(200, k))], 1)
    q = np.linalg.qr(a)[0][:, 1:]
    x = 7.0 * q @ _orthogonal(64, rng)[:k] + 3.0  # a constant offset is removed by the centring
    assert G.effective_rank(x) == pytest.approx(k, rel=1e-9)
    # a sampled (not exactly isotropic) Gaussian cloud: close to k, never above
    y = rng.normal(size=(5000, k)) @ _orthogonal(64, rng)[:k]
    assert 0.97 * k <= G.effective_rank(y) <= k + 1e-9
    assert np.isnan(G.effective_rank(np.ones((10, 4))))


def test_effective_rank_reads_anisotropy():
    rng = np.random.default_rng(3)
    # two directions, one with 100x the other's singular value: between 1 and 2, near 1
    x = rng.normal(size=(2000, 2)) * np.array([100.0, 1.0])
    assert 1.0 < G.effective_rank(x) < 1.1


# --------------------------------------------------------------------------------------------------------------------
# Token-identity probe (control task, selectivity) and tuned lens


def _prompt_rows(rng, n_tasks=8, n_eps=6, n_steps=3, prompt_len=6, vocab=20):
    """Rows of a synthetic collection: every task has a fixed prompt (tokens from a shared vocabulary), repeated in
    each episode and rollout step; returns tokens, task, episode and slot (task, position) per row."""
    prompts = rng.integers(0, vocab, size=(n_tasks, prompt_len))
    t, e, p = np.meshgrid(np.arange(n_tasks), np.arange(n_eps), np.arange(n_steps * prompt_len), indexing="ij")
    t, e, p = t.ravel(), e.ravel() + n_eps * t.ravel(), p.ravel() % prompt_len
    return prompts[t, p], t, e, t * prompt_len + p


def test_token_probe_perfect_encoding_is_selective():
    rng = np.random.default_rng(0)
    tokens, task, _, slot = _prompt_rows(rng)
    emb = rng.normal(size=(20, 32))
    x = emb[tokens] + 0.05 * rng.normal(size=(len(tokens), 32))
    r = TP.token_identity_probe(x, tokens, task, slot)
    assert r.accuracy > 0.98 and r.coverage > 0.5  # tasks held out: tokens of unseen prompts, read off the state
    assert r.control_accuracy < 0.3 and r.selectivity > 0.65
    assert r.n_splits == 5 and r.n_groups == 8


def test_token_probe_on_random_states_has_no_selectivity():
    rng = np.random.default_rng(1)
    tokens, task, _, slot = _prompt_rows(rng)
    r = TP.token_identity_probe(rng.normal(size=(len(tokens), 32)), tokens, task, slot)
    assert r.accuracy < 0.2 and abs(r.selectivity) < 0.1


def test_token_probe_control_catches_a_context_memoriser():
    """States that encode the prompt slot (task, position) but not the token: split by episode, the probe reaches
    ~1 by memorising slot → token, and the control task (slots relabelled at random) equally: selectivity ~0."""
    rng = np.random.default_rng(2)
    tokens, task, episode, slot = _prompt_rows(rng)
    x = rng.normal(size=(slot.max() + 1, 64))[slot] + 0.05 * rng.normal(size=(len(slot), 64))
    by_episode = TP.token_identity_probe(x, tokens, episode, slot)
    assert by_episode.accuracy > 0.95 and by_episode.control_accuracy > 0.95 and abs(by_episode.selectivity) < 0.05
    by_task = TP.token_identity_probe(x, tokens, task, slot)  # unseen prompts: the memoriser has nothing to read
    assert by_task.accuracy < 0.3


def test_control_labels_keep_the_label_distribution():
    rng = np.random.default_rng(3)
    tokens, _, _, slot = _prompt_rows(rng)
    c = TP.control_labels(tokens, slot, seed=0)
    first = np.unique(slot, return_index=True)[1]
    assert sorted(c[first]) == sorted(tokens[first])  # a permutation of the slots' tokens
    assert (c[first] != tokens[first]).mean() > 0.5
    for s in np.unique(slot):  # one label per slot
        assert len(np.unique(c[slot == s])) == 1
    with pytest.raises(ValueError, match="control"):
        TP.control_labels(tokens, slot, kind="word")


def _lens_data(rng, vocab=60, width=32):
    tokens, task, _, _ = _prompt_rows(rng, vocab=vocab)
    emb = rng.normal(size=(vocab, width)).astype(np.float32)
    final = emb[tokens] + 0.05 * rng.normal(size=(len(tokens), width))  # the unembedding input: E·u tops the token
    a = _orthogonal(width, rng) * np.linspace(0.5, 2.0, width)  # well conditioned, not aligned with the identity
    x = final @ a.T + rng.normal(size=width) * 4 + 0.01 * rng.normal(size=(len(tokens), width))  # an affine map of it
    return x, final, tokens, task, emb


def test_tuned_lens_recovers_tokens_from_an_affine_map_of_the_unembedding_input():
    rng = np.random.default_rng(4)
    x, final, tokens, task, emb = _lens_data(rng)
    _, rank = TP.vocab_scores(final, tokens, emb)
    assert (rank == 0).mean() > 0.99  # the target itself decodes (the premise)
    r = TP.tuned_lens(x, final, tokens, task, emb, target_normed=True)
    assert r.top1 > 0.97 and r.translator_r2 > 0.95 and r.n_splits == 5
    assert r.logit_top1 < 0.3  # the untranslated state does not read through the unembedding
    # the same with a pre-norm target read through the final RMSNorm (scale offset 0: norm only rescales)
    r2 = TP.tuned_lens(x, 3.0 * final, tokens, task, emb, np.zeros(32), target_normed=False)
    assert r2.top1 > 0.97


def test_tuned_lens_on_states_without_the_tokens_reads_nothing():
    rng = np.random.default_rng(5)
    _, final, tokens, task, emb = _lens_data(rng)
    r = TP.tuned_lens(rng.normal(size=final.shape), final, tokens, task, emb, target_normed=True)
    assert r.top1 < 0.1 and r.translator_r2 < 0.1


def test_vocab_scores_match_a_dense_softmax():
    rng = np.random.default_rng(6)
    h, emb, ids = rng.normal(size=(7, 5)), rng.normal(size=(30, 5)), rng.integers(0, 30, 7)
    z = h @ emb.T
    nll, rank = TP.vocab_scores(h, ids, emb, chunk=4)
    want = np.log(np.exp(z).sum(1)) - z[np.arange(7), ids]
    np.testing.assert_allclose(nll, want, rtol=1e-4)
    np.testing.assert_array_equal(rank, (z > z[np.arange(7), ids][:, None]).sum(1))


# --------------------------------------------------------------------------------------------------------------------
# Through the store: the pooled pass, the control collection, the report

from openpi.latents import analysis as A  # noqa: E402
from openpi.latents import report  # noqa: E402
from openpi.latents.analysis.run.result import pooled_values  # noqa: E402

N_TASKS, VOCAB = 6, 12


def _planted_store(root, syn, *, trained: bool):
    """Text states with known information: trained, layer 0 = the token's embedding (perfect encoding), layer 1 =
    noise (none), layer 2 = an affine map of the final representation (``text_only_final_norm`` = E[token], which
    the unembedding reads as the token); untrained (the control), noise everywhere."""
    from test_analysis import build_store

    prompts = np.random.default_rng(0).integers(1, VOCAB, (N_TASKS, syn.T))
    mix = _orthogonal(syn.W, np.random.default_rng(1)) * np.linspace(0.5, 2.0, syn.W)

    def rec(t, k, i):
        r = syn.record(t, k, i)
        ids = np.where(r["text_mask"], prompts[t], 0).astype(np.int32)
        rng = np.random.default_rng([t, k, i, 7])
        final = syn.embedding[ids] + 0.05 * rng.normal(size=(1, syn.T, syn.W))
        text = rng.normal(size=(syn.L, 1, syn.T, syn.W))
        if trained:
            text[0] = syn.embedding[ids] + 0.05 * rng.normal(size=(1, syn.T, syn.W))
            text[2] = final @ mix.T + 1.0
        r |= {"tokenized_prompt": ids, "text_only_hidden_states": text.astype(np.float32)}
        return r | {"text_only_final_norm": final.astype(np.float32)}

    return build_store(root, rec, tasks=tuple(range(N_TASKS)), episodes=2, steps=3)


@pytest.mark.slow
def test_pooled_metrics_through_the_store_with_a_control_collection(tmp_path):
    from test_analysis import Synth, check_report

    syn = Synth(V=VOCAB, T=10, n_valid=8, W=24)
    syn.scale = np.zeros(syn.W, np.float32)
    trained = _planted_store(tmp_path / "trained", syn, trained=True)
    control = _planted_store(tmp_path / "random", syn, trained=False)
    res = A.analyze_collection(
        trained, embedding=syn.token_embedding(), probe=False, n_boot=50, pooled_steps_per_episode=3,
        control=control, control_label="random init (same observations)", control_embedding=syn.token_embedding(),
    )  # fmt: skip
    info = res.pooled_info
    assert (info["n_tasks"], info["n_episodes"], info["n_inferences"], info["split"]) == (6, 12, 36, "task")
    acc = pooled_values(res, "text_only", "token_probe")
    sel = pooled_values(res, "text_only", "token_probe", "selectivity")
    assert acc[0] > 0.95 and sel[0] > 0.6  # the embedding: token identity, read on prompts never trained on
    assert abs(sel[1]) < 0.2  # noise: nothing beyond the control
    csel = pooled_values(res.control, "text_only", "token_probe", "selectivity")
    assert np.all(np.abs(csel) < 0.2)  # the random control shows no selectivity at any layer
    lens = res.pooled[("text_only", "tuned_lens")]
    assert lens[2].extra["target"].startswith("text_only_final_norm") and lens[2].extra["final_top1"] > 0.9
    assert lens[2].value > 0.9 and lens[2].extra["logit_lens_top1"] < 0.5  # the affine map undone by the lens
    assert lens[1].value < 0.3
    # geometry: CKA rows line up across layers; layer 1 (noise) is unlike layer 0
    cka = res.pooled[("text_only", "cka_layers")]
    assert cka[0].extra["row"] == [pytest.approx(1.0)] and abs(cka[1].value) < 0.2
    assert len(res.pooled[("expert_1", "cka_denoise")][0].extra["matrix"]) == syn.S
    assert pooled_values(res, "expert_1", "cka_experts").shape == (syn.L,)
    erank = pooled_values(res, "text_only", "effective_rank")
    assert np.all((erank >= 1) & (erank <= syn.W))
    data = report.write_report(res, tmp_path / "rep")
    check_report(tmp_path / "rep", data)
    entry = data["metrics"]["token_probe"]["text_only"]
    assert entry["control"]["label"] == "random init (same observations)" and len(entry["control"]["per_layer"]) == 3
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "held out by task" in md and "random init (same observations)" in md and "6 tasks, 12 episodes" in md


def test_pooled_settings_are_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="pooled_split"):
        A.analyze_collection(tmp_path / "nothing", pooled_split="steps")
