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


def test_final_norm_capture_is_the_final_norm_of_the_last_layer(tiny_a):
    model, obs, noise = tiny_a
    cfg = model.config
    spec = CaptureSpec(expert_0="off", expert_1="off", attention_to_text=False, final_norm=True, dtype="float32")
    out = jax.tree.map(np.asarray, model.infer_with_latents(jax.random.key(0), obs, num_steps=3, noise=noise, capture=spec))
    got = out["text_only_final_norm"]
    assert got.shape == (obs.state.shape[0], cfg.max_token_len, cfg.paligemma_config.width)
    h = _last_layer_output(model, obs)[:, cfg.text_start : cfg.prefix_len]
    scale = np.asarray(model.params["PaliGemma"]["llm"]["final_norm"]["scale"], np.float64)
    want = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # it is not just the last captured residual entry (the stream entering the last layer) renormalised
    last_in = out["text_only_hidden_states"][-1].astype(np.float64)
    assert np.abs(last_in / np.sqrt(np.mean(last_in**2, -1, keepdims=True)) * (1 + scale) - want).max() > 1e-3


def test_final_norm_capture_never_changes_actions(tiny_a):
    model, obs, noise = tiny_a
    plain = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=3, noise=noise))
    for spec in (CaptureSpec(final_norm=True), dataclasses.replace(CaptureSpec.off(), final_norm=True)):
        out = model.infer_with_latents(jax.random.key(0), obs, num_steps=3, noise=noise, capture=spec)
        assert np.array_equal(plain, np.asarray(out["actions"])), spec
        assert "text_only_final_norm" in out
    assert "text_only_final_norm" not in model.infer_with_latents(
        jax.random.key(0), obs, num_steps=3, noise=noise, capture=CaptureSpec()
    )


# --------------------------------------------------------------------------------------------------------------------
# Geometry: linear CKA and effective rank

from openpi.latents.analysis import geometry as G  # noqa: E402
from openpi.latents.analysis import token_probe as TP  # noqa: E402


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
