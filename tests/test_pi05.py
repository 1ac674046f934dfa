"""pi0.5 (`Pi0Config(pi05=True)`) against upstream openpi's golden fixture (tests/data/pi05_tiny_a), float32 on CPU;
the bf16 path; the full-size param tree; the pi05_libero policy end to end; capture contracts over two pi0.5 configs.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from model_inputs import (
    abstract_observation,
    fixture_observation,
    max_abs_diff,
    pi05_tiny_a_config,
    random_observation,
    raw_libero_observation,
)

# The pi0 capture contracts, run here over pi0.5 configs (this module's `setup` fixture).
from test_pi0_capture import (  # noqa: F401
    NUM_STEPS,
    test_capture_layer_that_does_not_exist,
    test_capture_never_changes_actions,
    test_infer_with_latents_shapes,
    test_layer_and_step_selection_and_dtype,
    test_sample_actions_with_inference_steps,
)

from openpi.models import gemma, pi0
from openpi.models import model as _model
from openpi.models import suffix as _suffix
from openpi.models import tokenizer as _tokenizer
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config

ATOL = 1e-4
ASSET_ID = "physical-intelligence/libero"


@pytest.fixture(scope="module")
def params(pi05_dir):
    return _model.restore_params(pi05_dir / "checkpoint" / "params", restore_type=np.ndarray)


@pytest.fixture(scope="module")
def model(params):
    return pi05_tiny_a_config().load(params)


@pytest.fixture(scope="module")
def obs(pi05_inputs):
    return fixture_observation(pi05_inputs)


@pytest.fixture(scope="module")
def latents(model, obs, pi05_inputs):
    spec = CaptureSpec(expert_0="full", expert_1="full", dtype="float32", modulation=True)
    return model.infer_with_latents(jax.random.key(0), obs, noise=pi05_inputs["noise"], capture=spec)


def _valid(expected):
    return expected["prefix_mask"][0]


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_resolves_like_upstream():
    c = pi0.Pi0Config(pi05=True)
    assert (c.max_token_len, c.discrete_state_input, c.suffix_len) == (200, True, 50)
    p = pi0.Pi0Config()
    assert (p.max_token_len, p.discrete_state_input, p.suffix_len) == (48, False, 51)
    kept = pi0.Pi0Config(pi05=True, max_token_len=64, discrete_state_input=False, action_horizon=10)
    assert (kept.max_token_len, kept.discrete_state_input, kept.suffix_len) == (64, False, 10)
    assert c.suffix_segment_names == ("action_0", "actions_1:") and p.suffix_segment_names == ("state", "actions")


# ---------------------------------------------------------------------------------------------------------------------
# Model against the fixture (float32)


def test_actions_match_upstream(model, obs, pi05_inputs, pi05_expected):
    actions = model.sample_actions(jax.random.key(0), obs, noise=pi05_inputs["noise"])
    assert actions.shape == (1, 10, 32) and actions.dtype == jnp.float32
    np.testing.assert_allclose(actions, pi05_expected["actions"], atol=ATOL, rtol=ATOL)


def test_denoising_trajectory_velocities_times_and_condition(latents, pi05_expected):
    np.testing.assert_allclose(latents["x_t"], pi05_expected["denoise_trajectory"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(latents["v_t"], pi05_expected["denoise_v_t"], atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(latents["denoise_times"], pi05_expected["denoise_times"])  # float32 accumulation
    np.testing.assert_allclose(latents["adarms_cond"], pi05_expected["denoise_adarms_cond"], atol=ATOL, rtol=ATOL)
    # Every step's action-expert layer inputs (Ts = H: no state token).
    e1 = latents["expert_1_hidden_states"]
    assert e1.shape == pi05_expected["denoise_expert_layer_inputs"].shape
    np.testing.assert_allclose(e1, pi05_expected["denoise_expert_layer_inputs"], atol=ATOL, rtol=ATOL)


def test_modulation_capture_matches_upstream(latents, pi05_expected):
    mod = latents["expert_1_modulation"]  # [S, L, B, 2 (pre-attention, pre-FFN), 3 (scale, shift, gate), W1]
    s, depth, b, _, _, w = mod.shape
    assert (s, mod.shape[3], mod.shape[4]) == (10, 2, 3)
    # The fixture lays each modulation out flat as [scale | shift | gate].
    for i, key in enumerate(("step0_adarms_mod_pre_attention", "step0_adarms_mod_pre_ffw")):
        flat = mod[0, :, :, i].reshape(depth, b, 3 * w)
        np.testing.assert_allclose(flat, pi05_expected[key], atol=ATOL, rtol=ATOL)


def test_prefix_tokens_mask_and_kv_cache(model, obs, pi05_expected):
    tokens, mask, ar = model.embed_prefix(obs)
    np.testing.assert_array_equal(mask, pi05_expected["prefix_mask"])
    np.testing.assert_array_equal(ar, pi05_expected["prefix_ar_mask"])
    np.testing.assert_allclose(tokens, pi05_expected["prefix_tokens"], atol=ATOL, rtol=ATOL)
    attn = pi0.make_attn_mask(mask, ar)
    np.testing.assert_array_equal(attn, pi05_expected["prefix_attn_mask"])
    positions = jnp.cumsum(mask, axis=1) - 1
    np.testing.assert_array_equal(positions, pi05_expected["prefix_positions"])
    # The prefix pass runs expert 0 only: no condition needed.
    (out, none), (k, v), _ = model.config.llm().apply(
        {"params": model.params["PaliGemma"]["llm"]}, [tokens, None], positions, attn
    )
    assert none is None
    valid = _valid(pi05_expected)
    assert max_abs_diff(out[:, valid], pi05_expected["prefix_out"][:, valid]) < ATOL
    assert max_abs_diff(k[:, :, valid], pi05_expected["kv_cache_k"][:, :, valid]) < ATOL
    assert max_abs_diff(v[:, :, valid], pi05_expected["kv_cache_v"][:, :, valid]) < ATOL


def test_expert_layer_inputs(latents, pi05_expected):
    valid = _valid(pi05_expected)
    e0 = latents["expert_0_hidden_states"]
    assert e0.shape == pi05_expected["prefix_vlm_layer_inputs"].shape
    assert max_abs_diff(e0[:, :, valid], pi05_expected["prefix_vlm_layer_inputs"][:, :, valid]) < ATOL
    np.testing.assert_allclose(
        latents["expert_1_hidden_states"][0], pi05_expected["step0_expert_layer_inputs"], atol=ATOL, rtol=ATOL
    )


def test_first_denoising_step(model, obs, pi05_inputs, pi05_expected):
    e = pi05_expected
    t = jnp.broadcast_to(e["step0_time"], (1,))
    w1 = model.config.action_expert_config.width
    emb = pi0.posemb_sincos(t, w1, min_period=4e-3, max_period=4.0)
    np.testing.assert_allclose(emb, e["step0_time_emb"], atol=ATOL, rtol=ATOL)
    hidden = jax.nn.swish(_suffix.linear(model.params["time_mlp_in"], emb))
    np.testing.assert_allclose(hidden, e["step0_time_mlp_hidden"], atol=ATOL, rtol=ATOL)
    cond = model.adarms_cond(t)
    np.testing.assert_allclose(cond, e["step0_adarms_cond"], atol=ATOL, rtol=ATOL)

    tokens, mask, ar = model.embed_suffix(obs, pi05_inputs["noise"], t)
    np.testing.assert_allclose(tokens, e["step0_suffix_tokens"], atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(mask, e["step0_suffix_mask"])
    np.testing.assert_array_equal(ar, e["step0_suffix_ar_mask"])

    # One action-expert pass over the cached prefix, assembled by hand from the fixture's masks and positions.
    llm_params = {"params": model.params["PaliGemma"]["llm"]}
    prefix_tokens, prefix_mask, prefix_ar = model.embed_prefix(obs)
    prefix_positions = jnp.cumsum(prefix_mask, axis=1) - 1
    _, kv, _ = model.config.llm().apply(
        llm_params, [prefix_tokens, None], prefix_positions, pi0.make_attn_mask(prefix_mask, prefix_ar)
    )
    full_mask = jnp.concatenate(
        [jnp.repeat(prefix_mask[:, None], mask.shape[1], axis=1), pi0.make_attn_mask(mask, ar)], axis=-1
    )
    np.testing.assert_array_equal(full_mask, e["step0_full_attn_mask"])
    positions = jnp.sum(prefix_mask, -1)[:, None] + jnp.arange(mask.shape[1])
    np.testing.assert_array_equal(positions, e["step0_suffix_positions"])
    (_, out), _, _ = model.config.llm().apply(
        llm_params, [None, tokens], positions, full_mask, kv_cache=kv, adarms_cond=[None, cond]
    )
    np.testing.assert_allclose(out, e["step0_suffix_out"], atol=ATOL, rtol=ATOL)
    v_t = _suffix.linear(model.params["action_out_proj"], out)
    np.testing.assert_allclose(v_t, e["step0_v_t"], atol=ATOL, rtol=ATOL)
    # The final norm's modulation: cond @ Dense_0 + bias of final_norm_1 (arithmetic on the params).
    dense = model.params["PaliGemma"]["llm"]["final_norm_1"]["Dense_0"]
    np.testing.assert_allclose(_suffix.linear(dense, cond), e["step0_adarms_mod_final"], atol=ATOL, rtol=ATOL)


def test_loss_with_stored_noise_and_time(model, obs, pi05_inputs, pi05_expected):
    actions = pi05_inputs["loss_actions"]
    loss, *_ = model._loss_pass(
        jax.random.key(0), obs, actions, train=False, noise=pi05_inputs["loss_noise"], time=pi05_inputs["loss_time"]
    )
    np.testing.assert_allclose(loss, pi05_expected["loss"], atol=ATOL, rtol=ATOL)
    rng = jax.random.key(int(pi05_inputs["loss_rng_seed"]))
    np.testing.assert_allclose(model.compute_loss(rng, obs, actions), pi05_expected["loss"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(
        model.adarms_cond(jnp.asarray(pi05_inputs["loss_time"])), pi05_expected["loss_adarms_cond"], atol=ATOL
    )
    extra = model.compute_loss_with_extra(rng, obs, actions)
    np.testing.assert_allclose(extra["loss_sum"], pi05_expected["loss"].sum(), rtol=1e-5)
    np.testing.assert_allclose(
        extra["expert_1_hidden_states_sum"], pi05_expected["loss_expert_layer_inputs"][:, 0], atol=ATOL, rtol=ATOL
    )


def test_discrete_state_prompt_and_actions(params, pi05_dir, pi05_inputs, pi05_expected):
    e = pi05_expected
    state = e["normalized_state"][0]
    np.testing.assert_array_equal(_tokenizer.discretize_state(state), e["state_bins"][0])
    assert set(e["state_bins"][0]) >= {-1, 255}  # the fixture's state under- and overflows the bins
    prompt = str(pi05_inputs["prompt"][0])
    assert _tokenizer.discrete_state_prompt(prompt, state) == str(e["ds_prompt_text"][0])
    tok = _tokenizer.PaligemmaTokenizer(200, pi05_dir / "tokenizer.model")
    tokens, mask = tok.tokenize(prompt, state)
    np.testing.assert_array_equal(tokens, pi05_inputs["ds_tokenized_prompt"][0])
    np.testing.assert_array_equal(mask, pi05_inputs["ds_tokenized_prompt_mask"][0])
    assert mask.sum() == int(e["ds_untruncated_token_len"][0])
    # The model never reads discrete_state_input: the ds prompt changes the actions through the tokens alone.
    model = pi05_tiny_a_config(discrete_state_input=True).load(params)
    ds_obs = fixture_observation(pi05_inputs, prefix="ds_")
    actions = model.sample_actions(jax.random.key(0), ds_obs, noise=pi05_inputs["noise"])
    np.testing.assert_allclose(actions, e["ds_actions"], atol=ATOL, rtol=ATOL)


def test_state_bins_edges_and_truncation(pi05_dir):
    # Bin k covers [-1 + k/128, -1 + (k+1)/128); below -1 is -1, from 1 - 1/128 upwards (no clipping) is 255.
    s = np.array([-1.5, -1.0000001, -1.0, -1 + 1 / 128, 0.0, 0.99, 1 - 1 / 128, 1.0, 7.0])
    np.testing.assert_array_equal(_tokenizer.discretize_state(s), [-1, -1, 0, 1, 128, 254, 255, 255, 255])
    tok = _tokenizer.PaligemmaTokenizer(12, pi05_dir / "tokenizer.model")
    tokens, mask = tok.tokenize("open the drawer", np.zeros(8))
    assert mask.all() and tokens[0] == 2  # truncated to max_len (the end of the string is cut), BOS first


def test_bf16_path_stays_close_to_upstream_bf16(pi05_dir, obs, pi05_inputs, pi05_expected):
    params = _model.restore_params(pi05_dir / "checkpoint" / "params", dtype=jnp.bfloat16)
    model = pi05_tiny_a_config("bfloat16").load(params)
    actions = model.sample_actions(jax.random.key(0), obs, noise=pi05_inputs["noise"])
    assert actions.dtype == jnp.float32
    # Upstream's bf16 run differs from its float32 run by 0.014 (config.json); bf16 kernels differ across XLA
    # versions, so allow a few times that. Measured here: see README (fidelity table).
    diff = max_abs_diff(actions, pi05_expected["actions_bf16"])
    assert diff < 0.05, diff


# ---------------------------------------------------------------------------------------------------------------------
# Full-size param tree and checkpoints


def _flat_shapes(tree):
    return {
        "/".join(str(k.key) for k in path): (list(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_eval_shape_matches_full_size_param_tree(pi05_dir):
    reference = json.loads((pi05_dir.parent / "pi05_default_param_shapes.json").read_text())
    config = pi0.Pi0Config(pi05=True)
    model = jax.eval_shape(lambda: config.create(jax.random.key(0)))
    flat = _flat_shapes(model.params)
    assert flat == {k: (v["shape"], v["dtype"]) for k, v in reference["params"].items()}
    assert len(flat) == reference["num_leaves"] == 51
    assert sum(np.prod(s) for s, _ in flat.values()) == reference["num_params"]


def test_eval_shape_full_size_outputs(pi05_dir):
    ref = json.loads((pi05_dir.parent / "pi05_default_param_shapes.json").read_text())["eval_shape_batch1"]
    config = pi0.Pi0Config(pi05=True)
    model = jax.eval_shape(lambda: config.create(jax.random.key(0)))
    obs = abstract_observation(config)

    def check(key, value):
        assert (list(value.shape), str(value.dtype)) == (ref[key]["shape"], ref[key]["dtype"]), key

    check("sample_actions_output", jax.eval_shape(lambda m, o: m.sample_actions(jax.random.key(0), o), model, obs))
    check(
        "compute_loss_output",
        jax.eval_shape(lambda m, o: m.compute_loss(jax.random.key(0), o, jnp.zeros((1, 50, 32))), model, obs),
    )

    def prefix(m, o):
        tokens, mask, ar = m.embed_prefix(o)
        pos = jnp.cumsum(mask, axis=1) - 1
        (out, _), kv, _ = config.llm().apply(
            {"params": m.params["PaliGemma"]["llm"]}, [tokens, None], pos, pi0.make_attn_mask(mask, ar)
        )
        return tokens, out, kv

    tokens, out, (k, v) = jax.eval_shape(prefix, model, obs)
    check("prefix_tokens", tokens)
    check("prefix_out_expert0", out)
    check("kv_cache_k", k)
    check("kv_cache_v", v)
    t = jnp.ones((1,))
    suffix = jax.eval_shape(lambda m, o: m.embed_suffix(o, jnp.zeros((1, 50, 32)), t), model, obs)
    for key, value in zip(("suffix_tokens", "suffix_mask", "suffix_ar_mask"), suffix, strict=True):
        check(key, value)
    check("adarms_cond", jax.eval_shape(lambda m: m.adarms_cond(t), model))


def test_loads_nnx_state_style_checkpoint(params, tmp_path, obs, pi05_inputs, pi05_expected):
    # openpi training writes nnx.State checkpoints: every leaf path ends in "value".
    wrapped = jax.tree.map(lambda x: {"value": x}, params)
    ocp.PyTreeCheckpointer().save(tmp_path / "params", ocp.args.PyTreeSave({"params": wrapped}))
    restored = _model.restore_params(tmp_path / "params", restore_type=np.ndarray)
    assert _flat_shapes(restored) == _flat_shapes(params)
    model = pi05_tiny_a_config().load(restored)
    actions = model.sample_actions(jax.random.key(0), obs, noise=pi05_inputs["noise"])
    np.testing.assert_allclose(actions, pi05_expected["actions"], atol=ATOL, rtol=ATOL)


def test_pi0_and_pi05_checkpoints_do_not_mix(params):
    pi0_config = dataclasses.replace(pi05_tiny_a_config(), pi05=False)
    with pytest.raises(ValueError, match=r"missing \(first: PaliGemma/llm/final_norm_1/scale"):
        pi0_config.load(params)


# ---------------------------------------------------------------------------------------------------------------------
# pi05_libero policy end to end


def _fixture_policy(pi05_dir, discrete_state_input=False):
    preset = policy_config.get_preset("pi05_libero_tiny")
    config = dataclasses.replace(preset.model_config, discrete_state_input=discrete_state_input)
    return policy_config.create_trained_policy(
        dataclasses.replace(preset, model_config=config),
        pi05_dir / "checkpoint",
        asset_id=ASSET_ID,
        tokenizer_path=pi05_dir / "tokenizer.model",
    )


def test_presets():
    full = policy_config.get_preset("pi05_libero")
    assert full.default_checkpoint == "gs://openpi-assets/checkpoints/pi05_libero"
    assert full.asset_id == ASSET_ID and full.model_type == "pi05"
    c = full.model_config
    assert (c.pi05, c.action_horizon, c.discrete_state_input, c.max_token_len, c.dtype) == (
        True,
        10,
        False,
        200,
        "bfloat16",
    )
    assert policy_config.get_preset("pi05_libero_tiny").model_config.pi05
    with pytest.raises(ValueError, match="model_type='pi05' exactly with"):
        dataclasses.replace(full, model_type="pi0")


def test_transforms_have_no_delta_and_use_quantiles(pi05_dir):
    preset = policy_config.get_preset("pi05_libero_tiny")
    stats = policy_config.load_checkpoint_norm_stats(pi05_dir / "checkpoint", ASSET_ID)
    tok = _tokenizer.PaligemmaTokenizer(200, pi05_dir / "tokenizer.model")
    inputs, outputs = policy_config.make_transforms(preset, stats, tok)
    assert [type(t).__name__ for t in inputs] == [
        "InjectDefaultPrompt",
        "LiberoInputs",
        "Normalize",
        "InjectDefaultPrompt",
        "ResizeImages",
        "TokenizePrompt",
        "PadStatesAndActions",
    ]
    assert [type(t).__name__ for t in outputs] == ["Unnormalize", "LiberoOutputs"]
    assert inputs[2].use_quantiles and outputs[0].use_quantiles
    assert inputs[5].discrete_state_input is False


def test_policy_actions_from_raw_inputs(pi05_dir, pi05_inputs, pi05_expected):
    policy = _fixture_policy(pi05_dir)
    raw = raw_libero_observation(pi05_inputs)
    out = policy.infer(raw, noise=pi05_inputs["noise"][0])
    assert out["actions"].shape == (10, 7) and out["actions"].dtype == np.float64
    np.testing.assert_allclose(out["actions"], pi05_expected["policy_actions"][0], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(out["state"], pi05_inputs["state"][0], atol=1e-6, rtol=0)
    # pi05_libero's prompt carries no state and there is no state token: the actions ignore the state (bit-exact).
    moved = {**raw, "observation/state": raw["observation/state"] + 0.5}
    np.testing.assert_array_equal(policy.infer(moved, noise=pi05_inputs["noise"][0])["actions"], out["actions"])


def test_discrete_state_policy_actions(pi05_dir, pi05_inputs, pi05_expected):
    policy = _fixture_policy(pi05_dir, discrete_state_input=True)
    raw = raw_libero_observation(pi05_inputs)
    inputs, _ = policy.prepare(raw)
    np.testing.assert_array_equal(inputs["tokenized_prompt"], pi05_inputs["ds_tokenized_prompt"])
    out = policy.infer(raw, noise=pi05_inputs["noise"][0])
    np.testing.assert_allclose(out["actions"], pi05_expected["ds_policy_actions"][0], atol=ATOL, rtol=ATOL)


def test_tiny_preset_random_params_runs_without_download(pi05_inputs):
    policy = policy_config.create_trained_policy("pi05_libero_tiny", sample_kwargs={"num_steps": 2})
    out = policy.infer_with_latents(raw_libero_observation(pi05_inputs))
    assert out["actions"].shape == (10, 7) and np.isfinite(out["actions"]).all()
    assert out["latents"]["text_mask"].shape == (1, 200)
    assert out["latents"]["expert_1_segment_means"].shape[-2] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Capture contracts over two pi0.5 configs (the imported test_pi0_capture tests run on `setup`)

CONFIGS = {
    "pi05_dummy_b1": (pi05_tiny_a_config(), 1),
    "pi05_narrow_b2": (
        pi0.Pi0Config(
            pi05=True,
            dtype="float32",
            paligemma_variant=gemma.Config(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=8),
            action_expert_variant=gemma.Config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=8),
            action_horizon=6,
            max_token_len=16,
            siglip_variant="mu/14",
            vocab_size=512,
        ),
        2,
    ),
}


def _with_random_modulation(model, seed=0):
    """Upstream zero-initialises the adaptive norms (all gates 0): draw them so the action expert does something."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        jax.random.normal(k, x.shape) * 0.2 if any(getattr(p, "key", None) == "Dense_0" for p in path) else x
        for k, (path, x) in zip(keys, leaves, strict=True)
    ]
    return dataclasses.replace(model, params=jax.tree_util.tree_unflatten(treedef, new))


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    config, batch = CONFIGS[request.param]
    model = _with_random_modulation(config.create(jax.random.key(1)))
    obs = random_observation(config, batch, seed=3)
    noise = np.random.default_rng(4).normal(size=(batch, config.action_horizon, config.action_dim)).astype(np.float32)
    return model, obs, noise, batch


def test_modulation_capture_contract(setup):
    model, obs, noise, b = setup
    cfg = model.config
    plain = np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise))
    spec = CaptureSpec(modulation=True, layers=(cfg.depth - 1,), denoise_steps=(0, NUM_STEPS - 1), dtype="float32")
    out = model.infer_with_latents(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise, capture=spec)
    assert np.array_equal(np.asarray(out["actions"]), plain)  # bit-identical
    w1 = cfg.action_expert_config.width
    assert out["expert_1_modulation"].shape == (2, 1, b, 2, 3, w1)
    assert out["adarms_cond"].shape == (2, b, w1)
    # Modulation = cond @ Dense_0 + bias of the layer's norm (arithmetic on the params and the captured condition).
    layers = model.params["PaliGemma"]["llm"]["layers"]
    for i, norm in enumerate(("pre_attention_norm_1", "pre_ffw_norm_1")):
        dense = jax.tree.map(lambda x: x[cfg.depth - 1], layers[norm]["Dense_0"])
        expected = _suffix.linear(dense, out["adarms_cond"]).reshape(2, b, 3, w1)
        np.testing.assert_allclose(out["expert_1_modulation"][:, 0, :, i], expected, atol=1e-5)
    # The condition is the time MLP at each captured step's t.
    times = np.asarray(out["denoise_times"])
    for j, t in enumerate(times):
        np.testing.assert_allclose(out["adarms_cond"][j], model.adarms_cond(jnp.full((b,), t)), atol=1e-6)


def test_modulation_capture_needs_pi05():
    config = dataclasses.replace(CONFIGS["pi05_dummy_b1"][0], pi05=False, max_token_len=16)
    model = config.create(jax.random.key(0))
    with pytest.raises(ValueError, match=r"only pi0\.5"):
        model.infer_with_latents(
            jax.random.key(0), random_observation(config, 1), num_steps=2, capture=CaptureSpec(modulation=True)
        )


def test_compute_loss_with_extra_pi05_groups(setup):
    model, obs, _, b = setup
    cfg = model.config
    actions = np.random.default_rng(0).normal(size=(b, cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    extra = model.compute_loss_with_extra(jax.random.key(5), obs, actions)
    assert extra["expert_1_hidden_states_sum"].shape == (cfg.depth, cfg.action_horizon, cfg.action_expert_config.width)
    assert model.token_group_names[-2:] == ("action_0", "actions_1:")
    rows = np.asarray(extra["attention_score_sum"]).sum(-1)
    masked_camera = model.token_group_names.index("right_wrist_0_rgb")
    np.testing.assert_allclose(np.delete(rows, masked_camera, axis=-1), b, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# LIBERO collection with pi05_libero_tiny through the CLI, then the analysis (real simulator)


@pytest.mark.libero
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_libero_collection_cli_and_analysis_pi05_tiny(tmp_path):
    import pathlib
    import subprocess
    import sys

    from openpi.latents import analysis, store

    repo = pathlib.Path(__file__).resolve().parents[1]
    root = tmp_path / "store"
    cmd = [
        sys.executable, str(repo / "scripts" / "inference_latent_collection.py"), "--preset", "pi05_libero_tiny",
        "--task-suite", "libero_goal", "--task-ids", "0", "--episodes-per-task", "1", "--max-steps", "10",
        "--num-denoise-steps", "3", "--capture.modulation", "--output-dir", str(root),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = policy_config.get_preset("pi05_libero_tiny").model_config
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["preset"] == "pi05_libero_tiny" and manifest["suffix_segment_names"] == ["action_0", "actions_1:"]
    steps = store.load_inference_task_data(root, 0)["episodes"]["episode_0"]["rollout_steps"]
    assert list(steps) == ["step_0", "step_5"]  # 10 env steps, a new chunk every 5
    L_, w1, h = config.depth, config.action_expert_config.width, config.action_horizon
    for step in steps.values():
        assert step["actions"].shape == (h, 7) and np.isfinite(step["actions"]).all()
        assert step["text_mask"].shape == (1, 200) and 0 < step["text_mask"].sum() < 200
        assert step["expert_1_segment_means"].shape == (3, L_, 1, 2, w1)
        assert step["attention_to_text"].shape == (3, L_, 1, config.action_expert_config.num_heads, h)  # Ts = H
        assert step["expert_1_modulation"].shape == (3, L_, 1, 2, 3, w1)
        assert step["adarms_cond"].shape == (3, 1, w1)

    res = analysis.analyze_collection(root, probe=False, n_boot=50)
    assert set(res.streams) == {"text_only", "expert_0", "expert_1"}
    assert res.has("text_only", "logit_top1")  # token-embedding metrics from the preset's random(seed=0) weights
    assert res.has("expert_1", "attention_to_text") and res.has("expert_1", "drift")
