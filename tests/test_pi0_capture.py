"""Capture contracts: capturing never changes actions; shapes of every capture API over two different configs."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from model_inputs import random_observation

from openpi.models import gemma, pi0, taps
from openpi.models.capture import CaptureSpec

# Two configs that differ in batch size, depth, widths (equal vs different expert widths), heads and horizon.
CONFIGS = {
    "dummy_b1": (
        pi0.Pi0Config(
            dtype="float32",
            paligemma_variant="dummy",
            action_expert_variant="dummy",
            siglip_variant="mu/14",
            vocab_size=1024,
        ),
        1,
    ),
    "narrow_b2": (
        pi0.Pi0Config(
            dtype="float32",
            paligemma_variant=gemma.Config(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=8),
            action_expert_variant=gemma.Config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=8),
            action_horizon=8,
            max_token_len=16,
            siglip_variant="mu/14",
            vocab_size=512,
        ),
        2,
    ),
}
NUM_STEPS = 3


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    config, batch = CONFIGS[request.param]
    model = config.create(jax.random.key(1))
    obs = random_observation(config, batch, seed=3)
    noise = np.random.default_rng(4).normal(size=(batch, config.action_horizon, config.action_dim)).astype(np.float32)
    return model, obs, noise, batch


def _run(model, obs, noise, capture):
    out = model.infer_with_latents(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise, capture=capture)
    return jax.tree.map(np.asarray, out)


@pytest.mark.slow
def test_capture_never_changes_actions(setup):
    model, obs, noise, _ = setup
    plain = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise))
    for spec in (CaptureSpec.off(), CaptureSpec(), CaptureSpec.everything()):
        captured = np.asarray(_run(model, obs, noise, spec)["actions"])
        assert np.array_equal(plain, captured), spec  # bit-identical, not just close


def test_infer_with_latents_shapes(setup):
    model, obs, noise, b = setup
    cfg = model.config
    L, S, W0, W1 = cfg.depth, NUM_STEPS, cfg.paligemma_config.width, cfg.action_expert_config.width
    N, Tp, Ts, n = cfg.paligemma_config.num_heads, cfg.prefix_len, cfg.suffix_len, cfg.max_token_len
    H, A = cfg.action_horizon, cfg.action_dim

    full = _run(model, obs, noise, dataclasses.replace(CaptureSpec.everything(), dtype="float32"))
    assert full["expert_0_hidden_states"].shape == (L, b, Tp, W0)
    assert full["expert_1_hidden_states"].shape == (S, L, b, Ts, W1)
    assert full["text_only_hidden_states"].shape == (L, b, n, W0)
    assert full["text_mask"].shape == (b, n)
    for key in ("attention_to_text", "attention_to_text_content", "attention_to_bos"):
        assert full[key].shape == (S, L, b, N, Ts), key
    assert full["attention_key_counts"].shape == (L, b, N, Ts, 4)
    assert full["x_t"].shape == (S + 1, b, H, A) and full["v_t"].shape == (S, b, H, A)
    assert full["denoise_times"].shape == (S,)
    np.testing.assert_array_equal(full["text_mask"], obs.tokenized_prompt_mask)
    cams = np.stack(
        [np.asarray(obs.image_masks[k]) for k in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")], 1
    )
    np.testing.assert_array_equal(full["segment_mask"], np.concatenate([cams, np.ones((b, 1), bool)], axis=1))
    # The text window is expert 0 at positions [cams * tokens_per_camera, + max_token_len): derived from the config.
    np.testing.assert_array_equal(
        full["text_only_hidden_states"], full["expert_0_hidden_states"][:, :, cfg.text_start :]
    )

    pooled = _run(model, obs, noise, CaptureSpec(dtype="float32"))
    assert pooled["expert_0_segment_means"].shape == (L, b, cfg.num_cameras + 1, W0)
    assert pooled["expert_1_segment_means"].shape == (S, L, b, 2, W1)
    assert "expert_0_hidden_states" not in pooled and "expert_1_hidden_states" not in pooled
    assert pooled["text_only_hidden_states"].dtype == np.float32

    # Pooled = masked means of the full streams (arithmetic on the full capture).
    e0 = np.asarray(full["expert_0_hidden_states"], np.float64)
    tpc = cfg.tokens_per_camera
    for c, key in enumerate(("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")):
        m = np.asarray(obs.image_masks[key], np.float64)[None, :, None]
        expected = e0[:, :, c * tpc : (c + 1) * tpc].mean(axis=2) * m
        np.testing.assert_allclose(pooled["expert_0_segment_means"][:, :, c], expected, atol=1e-5)
    tm = np.asarray(obs.tokenized_prompt_mask, np.float64)
    text_mean = (e0[:, :, cfg.text_start :] * tm[None, :, :, None]).sum(2) / tm.sum(1)[None, :, None]
    np.testing.assert_allclose(pooled["expert_0_segment_means"][:, :, -1], text_mean, atol=1e-5)
    e1 = np.asarray(full["expert_1_hidden_states"], np.float64)
    np.testing.assert_allclose(pooled["expert_1_segment_means"][:, :, :, 0], e1[:, :, :, 0], atol=1e-5)
    np.testing.assert_allclose(pooled["expert_1_segment_means"][:, :, :, 1], e1[:, :, :, 1:].mean(3), atol=1e-5)

    # Attention mass onto text is a probability mass.
    att = np.asarray(full["attention_to_text"])
    assert np.all(att >= 0) and np.all(att <= 1 + 1e-6) and att.max() > 0


@pytest.mark.slow
def test_layer_and_step_selection_and_dtype(setup):
    model, obs, noise, _b = setup
    cfg = model.config
    full = _run(model, obs, noise, dataclasses.replace(CaptureSpec.everything(), dtype="float32"))
    spec = CaptureSpec(expert_0="full", expert_1="full", layers=(cfg.depth - 1, 0), denoise_steps=(NUM_STEPS - 1,))
    sel = _run(model, obs, noise, spec)
    assert sel["expert_0_hidden_states"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(
        sel["expert_0_hidden_states"], full["expert_0_hidden_states"][[cfg.depth - 1, 0]].astype(jax.numpy.bfloat16)
    )
    expected = full["expert_1_hidden_states"][[NUM_STEPS - 1]][:, [cfg.depth - 1, 0]]
    np.testing.assert_array_equal(sel["expert_1_hidden_states"], expected.astype(jax.numpy.bfloat16))
    np.testing.assert_array_equal(sel["denoise_times"], full["denoise_times"][[NUM_STEPS - 1]])
    assert sel["attention_to_text"].shape[:2] == (1, 2)
    for key in ("attention_to_text_content", "attention_to_bos"):
        np.testing.assert_array_equal(sel[key], full[key][[NUM_STEPS - 1]][:, [cfg.depth - 1, 0]])
    np.testing.assert_array_equal(sel["attention_key_counts"], full["attention_key_counts"][[cfg.depth - 1, 0]])


def test_capture_layer_that_does_not_exist(setup):
    model, obs, noise, _ = setup
    depth = model.config.depth
    with pytest.raises(
        ValueError, match=rf"do not exist: this model has {depth} layers \(valid indices 0..{depth - 1}\)"
    ):
        _run(model, obs, noise, CaptureSpec(layers=(depth,)))
    with pytest.raises(ValueError, match="denoising step"):
        _run(model, obs, noise, CaptureSpec(denoise_steps=(NUM_STEPS,)))


def test_sample_actions_with_inference_steps(setup):
    model, obs, noise, b = setup
    cfg = model.config
    out = model.sample_actions_with_inference_steps(
        jax.random.key(0),
        obs,
        num_steps=NUM_STEPS,
        noise=noise,
        capture=dataclasses.replace(CaptureSpec.everything(), dtype="float32"),
    )
    assert set(out) == {"ar_process_steps", "flow_matching_steps", "final_action"}
    (prefix,) = out["ar_process_steps"]  # pi0: one prefix pass, no autoregressive decoding
    assert prefix["expert_0_hidden_states"].shape == (cfg.depth, b, cfg.prefix_len, cfg.paligemma_config.width)
    assert prefix["text_only_hidden_states"].shape == (cfg.depth, b, cfg.max_token_len, cfg.paligemma_config.width)
    steps = out["flow_matching_steps"]
    assert len(steps) == NUM_STEPS
    np.testing.assert_allclose([float(s["t"]) for s in steps], [1.0, 1 - 1 / 3, 1 - 2 / 3], rtol=1e-6)
    for s in steps:
        assert s["x_t"].shape == s["v_t"].shape == (b, cfg.action_horizon, cfg.action_dim)
        assert s["expert_1_hidden_states"].shape == (cfg.depth, b, cfg.suffix_len, cfg.action_expert_config.width)
    # Euler: x_{s+1} = x_s + dt * v_s, and the last update gives the final action.
    dt = -1.0 / NUM_STEPS
    for s0, s1 in itertools.pairwise(steps):
        np.testing.assert_allclose(s1["x_t"], s0["x_t"] + dt * s0["v_t"], atol=1e-6)
    np.testing.assert_allclose(out["final_action"], steps[-1]["x_t"] + dt * steps[-1]["v_t"], atol=1e-6)
    np.testing.assert_allclose(steps[0]["x_t"], noise)
    plain = model.sample_actions(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise)
    np.testing.assert_array_equal(out["final_action"], plain)


@pytest.mark.slow
def test_compute_loss_with_extra_shapes(setup):
    model, obs, _, b = setup
    cfg = model.config
    L, W0, W1, N = cfg.depth, cfg.paligemma_config.width, cfg.action_expert_config.width, cfg.paligemma_config.num_heads
    Tp, Ts, n = cfg.prefix_len, cfg.suffix_len, cfg.max_token_len
    actions = np.random.default_rng(0).normal(size=(b, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    rng = jax.random.key(5)
    extra = model.compute_loss_with_extra(rng, obs, actions)
    np.testing.assert_allclose(extra["loss_sum"], np.asarray(model.compute_loss(rng, obs, actions)).sum(), rtol=1e-5)
    assert extra["expert_0_hidden_states_sum"].shape == (L, Tp, W0)
    assert extra["expert_1_hidden_states_sum"].shape == (L, Ts, W1)
    assert extra["text_only_hidden_states_sum"].shape == (L, n, W0)
    if W0 == W1:
        assert extra["hidden_states_sum"].shape == (L, Tp + Ts, W0)
    else:
        assert [h.shape for h in extra["hidden_states_sum"]] == [(L, Tp, W0), (L, Ts, W1)]
    assert [x.shape for x in extra["post_attn_embedding_sum"]] == [(L, Tp, W0), (L, Ts, W1)]
    assert [x.shape for x in extra["post_attn_sum"]] == [(L, Tp, W0), (L, Ts, W1)]
    groups = len(model.token_group_names)
    assert extra["attention_score_sum"].shape == (L, N, groups, groups)
    assert extra["text_representation"].shape == (L, b, n, N, cfg.paligemma_config.head_dim)
    # post-attention residual = residual entering the layer + attention output (definition, checked by arithmetic).
    np.testing.assert_allclose(
        extra["post_attn_embedding_sum"][1],
        np.asarray(extra["expert_1_hidden_states_sum"]) + np.asarray(extra["post_attn_sum"][1]),
        atol=1e-4,
    )
    # Each query group's attention is a distribution over key groups: rows sum to b (batch sum) where the group has
    # valid queries in every example, 0 for the masked camera.
    rows = np.asarray(extra["attention_score_sum"]).sum(-1)
    masked_camera = model.token_group_names.index("right_wrist_0_rgb")
    np.testing.assert_allclose(np.delete(rows, masked_camera, axis=-1), b, rtol=1e-5)
    np.testing.assert_allclose(rows[..., masked_camera], 0, atol=1e-6)
    # Padding text positions are zeroed in the text sum.
    pad = ~np.asarray(obs.tokenized_prompt_mask).any(0)
    assert np.all(np.asarray(extra["text_only_hidden_states_sum"])[:, pad] == 0)


def test_analysis_accessors(setup):
    model, obs, _, b = setup
    cfg = model.config
    from openpi.models.model import preprocess_observation

    o = preprocess_observation(None, obs)
    tokens, mask, ar = model.embed_prefix(o)
    x_t = np.zeros((b, cfg.action_horizon, cfg.action_dim), np.float32)
    suffix, suffix_mask, suffix_ar = model.embed_suffix(o, x_t, np.ones((b,), np.float32))
    full_mask = np.concatenate([mask, suffix_mask], axis=1)
    attn = pi0.make_attn_mask(full_mask, np.concatenate([ar, suffix_ar]))
    positions = np.cumsum(full_mask, axis=1) - 1
    _, _, caps = cfg.llm(taps.hidden_state_taps(2)).apply(
        {"params": model.params["PaliGemma"]["llm"]}, [tokens, suffix], positions, attn
    )
    e0 = taps.Analysis.get_expert_0_hidden_states(caps)
    e1 = taps.Analysis.get_expert_1_hidden_states(caps)
    assert e0.shape == (cfg.depth, b, cfg.prefix_len, cfg.paligemma_config.width)
    assert e1.shape == (cfg.depth, b, cfg.suffix_len, cfg.action_expert_config.width)
    np.testing.assert_allclose(e0[0], tokens, atol=1e-6)  # layer 0 entry = the embedded input
    hs = taps.Analysis.get_hidden_states(caps)
    if cfg.paligemma_config.width == cfg.action_expert_config.width:
        assert hs.shape == (cfg.depth, b, cfg.prefix_len + cfg.suffix_len, cfg.paligemma_config.width)
    else:
        assert isinstance(hs, tuple) and [h.shape for h in hs] == [e0.shape, e1.shape]
    text, text_mask = taps.Analysis.get_text_only_hidden_states(
        caps, text_start=cfg.text_start, text_len=cfg.max_token_len, input_mask=mask
    )
    assert text.shape == (cfg.depth, b, cfg.max_token_len, cfg.paligemma_config.width)
    np.testing.assert_array_equal(text_mask, obs.tokenized_prompt_mask)
    with pytest.raises(KeyError, match="Expert 1"):
        taps.Analysis.get_expert_1_hidden_states({"hidden_states_0": e0})
