"""The FFN stream (issue 21 deliverable 4): capture of the FFN hidden activations, individual-neuron steer / ablate,
and the vocabulary projection of value vectors, on the positive control organism (float32)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi.models import neurons, patching
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config
from openpi.training import control_organisms as co

ORGANISMS = pathlib.Path(__file__).parent / "data" / "organisms"
SPEC = CaptureSpec(expert_0="off", expert_1="off", text=False, attention_to_text=False, trajectory=False, ffn="full",
                   dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    policy = policy_config.create_trained_policy("pi0_organism_tiny", ORGANISMS / "positive")
    rng = np.random.default_rng(0)
    _, obs = policy.prepare(co.raw_observations(rng, 1, np.array([0]))[0])
    noise = jnp.asarray(rng.standard_normal((1, 10, 32)), jnp.float32)
    return policy.model, obs, noise


def _capture(model, obs, noise, spec=SPEC, intervention=None):
    kw = {} if intervention is None else {"intervention": intervention}
    return model.infer_with_latents(jax.random.key(0), obs, noise=noise, capture=spec, num_steps=10, **kw)


def test_ffn_capture_is_what_the_down_projection_reads(setup):
    """hidden @ W_down is the FFN output (the mlp_out stream the patch program records), per expert and layer;
    pooled = the masked mean of the full capture over each segment's valid tokens."""
    model, obs, noise = setup
    out = _capture(model, obs, noise)
    rec = patching.record(model, obs, noise, num_steps=10)
    cfg = model.config
    h0 = np.asarray(out["expert_0_ffn_hidden"][:, 0])  # [L, Tp, F]
    h1 = np.asarray(out["expert_1_ffn_hidden"][:, :, 0])  # [S, L, Ts, F]
    assert h0.shape == (cfg.depth, cfg.prefix_len, cfg.paligemma_config.mlp_dim)
    w0, w1 = neurons.value_vectors(model, 0), neurons.value_vectors(model, 1)
    np.testing.assert_allclose(np.einsum("ltf,lfw->ltw", h0, w0), rec["sources"]["0/mlp_out"], atol=1e-4)
    np.testing.assert_allclose(np.einsum("sltf,lfw->sltw", h1, w1), rec["sources"]["1/mlp_out"], atol=1e-4)
    pooled = _capture(model, obs, noise, CaptureSpec(**{**SPEC.to_dict(), "ffn": "pooled"}))
    text_mask = np.asarray(rec["prefix_mask"][0]) & (np.arange(cfg.prefix_len) >= cfg.text_start)
    np.testing.assert_allclose(pooled["expert_0_ffn_means"][:, 0, -1], h0[:, text_mask].mean(1), atol=1e-5)
    np.testing.assert_allclose(pooled["expert_1_ffn_means"][:, :, 0, 1], h1[:, :, 1:].mean(2), atol=1e-5)


def test_neuron_ablate_and_steer_touch_only_their_neurons(setup):
    model, obs, noise = setup
    cfg = model.config
    base = np.asarray(_capture(model, obs, noise)["expert_0_ffn_hidden"][1, 0])
    text = slice(cfg.text_start, cfg.prefix_len)
    ablated = _capture(model, obs, noise, intervention=neurons.ablate_neurons(model, 0, "text", (1,), (3, 5)))
    got = np.asarray(ablated["expert_0_ffn_hidden"][1, 0])
    assert not got[text, [3, 5]].any() and base[text, [3, 5]].any()
    keep = np.ones(base.shape[-1], bool)
    keep[[3, 5]] = False
    np.testing.assert_array_equal(got[text][:, keep], base[text][:, keep])
    np.testing.assert_array_equal(got[: cfg.text_start], base[: cfg.text_start])  # image tokens untouched
    steered = _capture(model, obs, noise, intervention=neurons.steer_neurons(model, 0, "text", (1,), [7], 2.0))
    diff = np.asarray(steered["expert_0_ffn_hidden"][1, 0]) - base
    np.testing.assert_allclose(diff[text, 7], 2.0, atol=1e-6)
    diff[text, 7] = 0.0
    assert not diff.any()
    with pytest.raises(ValueError, match="neurons"):
        model.sample_actions(jax.random.key(0), obs, noise=noise,
                             intervention=neurons.ablate_neurons(model, 0, "text", (1,), (10_000,)))  # fmt: skip


def test_vocab_projection_is_the_down_projection_read_with_the_tied_embedding(setup):
    model, _, _ = setup
    ids, logits = neurons.vocab_projection(model, 2, neurons=[0, 9, 100], top_k=4, chunk=2)
    emb = np.asarray(model.params["PaliGemma"]["llm"]["embedder"]["input_embedding"], np.float64)
    want = neurons.value_vectors(model, 0)[2][[0, 9, 100]].astype(np.float64) @ emb.T
    np.testing.assert_array_equal(ids, np.argsort(-want, axis=1)[:, :4])
    np.testing.assert_allclose(logits, np.take_along_axis(want, ids, 1), rtol=1e-4)
