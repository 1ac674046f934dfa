"""Interventions: no-op edits equal the plain model; knockouts and patches do what they claim; errors; no recompiles.

Float32, the upstream fixture checkpoint (tests/data/pi0_tiny_a: Gemma 64w/4L x2, 8 heads, prefix 3*256 + 48 tokens,
suffix 1 + 50) and, for unequal expert widths and batch 2, a tiny random config.
"""

import jax
import numpy as np
import pytest
from model_inputs import fixture_observation, random_observation, tiny_a_config

from openpi.models import gemma, pi0, sampling
from openpi.models import intervention as iv
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config

NUM_STEPS = 3
EVERYTHING = CaptureSpec(expert_0="full", expert_1="full", dtype="float32")


@pytest.fixture(scope="module")
def model(tiny_a_dir):
    params = _model.restore_params(tiny_a_dir / "checkpoint" / "params", restore_type=np.ndarray)
    return tiny_a_config().load(params)


@pytest.fixture(scope="module")
def obs(tiny_a_inputs):
    return fixture_observation(tiny_a_inputs)


@pytest.fixture(scope="module")
def obs_b(tiny_a_inputs):
    """Prompt B: other token ids at the same valid positions (same token length) as the fixture's prompt."""
    tokens, mask = tiny_a_inputs["tokenized_prompt"], tiny_a_inputs["tokenized_prompt_mask"]
    other = np.where(mask, (tokens + 97) % 1023 + 1, 0).astype(np.int32)
    assert np.all(other[mask] != tokens[mask])
    return fixture_observation({**tiny_a_inputs, "tokenized_prompt": other})


@pytest.fixture(scope="module")
def noise(tiny_a_inputs):
    return tiny_a_inputs["noise"]


def _actions(model, obs, noise, intervention=None):
    out = model.sample_actions(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise, intervention=intervention)
    return np.asarray(out)


def _latents(model, obs, noise, intervention=None, capture=EVERYTHING):
    out = model.infer_with_latents(
        jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise, capture=capture, intervention=intervention
    )
    return jax.tree.map(np.asarray, out)


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def plain(model, obs, noise):
    return _actions(model, obs, noise)


@pytest.fixture(scope="module")
def plain_latents(model, obs, noise):
    return _latents(model, obs, noise)


# ---------------------------------------------------------------------------------------------------------------------
# No-op edits equal the plain model


def test_none_and_zero_steer_are_bit_identical(model, obs, noise, plain):
    np.testing.assert_array_equal(_actions(model, obs, noise, None), plain)
    rng = np.random.default_rng(0)
    noop = (
        iv.steer(0, "text", (1,), rng.normal(size=64), alpha=0.0)
        + iv.steer(1, "actions", None, rng.normal(size=(4, 64)), alpha=0.0, denoise_steps=(1,))
        + iv.steer(0, "base_0_rgb", (2,), rng.normal(size=(8, 16)), alpha=0.0, stream="head_out")
    )
    np.testing.assert_array_equal(_actions(model, obs, noise, noop), plain)
    assert iv.combine().ops == ()  # the empty intervention
    np.testing.assert_array_equal(_actions(model, obs, noise, iv.combine()), plain)


def test_patch_with_own_captures_is_a_noop(model, obs, noise, plain, plain_latents):
    own = iv.patch(0, "text", None, plain_latents["text_only_hidden_states"]) + iv.patch(
        1,
        "all",
        None,
        plain_latents["expert_1_hidden_states"],  # [S, L, B, Ts, W1]: per-step values
    )
    patched = _actions(model, obs, noise, own)
    print("patch with own captures: max |diff| =", _maxdiff(patched, plain))
    np.testing.assert_allclose(patched, plain, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_mean_ablation_of_one_token_is_a_noop(model, obs, noise, plain, plain_latents):
    ts = model.config.text_start
    span = (ts + 2, ts + 3)
    own_mean = plain_latents["expert_0_hidden_states"][:, :, span[0] : span[1]].mean(axis=2)  # [L, B, W0]
    np.testing.assert_array_equal(_actions(model, obs, noise, iv.ablate(0, span, None, "mean", own_mean)), plain)
    # mean=None: the span's own mean, computed in the program.
    np.testing.assert_array_equal(_actions(model, obs, noise, iv.ablate(0, span, None, "mean")), plain)
    # Over a longer span the mean is a real edit.
    assert _maxdiff(_actions(model, obs, noise, iv.ablate(0, "text", None, "mean")), plain) > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Knockouts and patches do what they claim


def test_text_knockout_makes_actions_prompt_independent(model, obs, obs_b, noise, plain):
    plain_b = _actions(model, obs_b, noise)
    print("prompt A vs B without knockout: max |diff| =", _maxdiff(plain, plain_b))
    assert _maxdiff(plain, plain_b) > 1e-3
    knockout = iv.knockout_attention("all", "text")
    a, b = _actions(model, obs, noise, knockout), _actions(model, obs_b, noise, knockout)
    print("prompt A vs B with text knockout: max |diff| =", _maxdiff(a, b))
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_patching_text_with_prompt_b_reproduces_b(model, obs, obs_b, noise):
    plain_b = _actions(model, obs_b, noise)
    text_b = _latents(model, obs_b, noise)["text_only_hidden_states"]  # [L, B, n, W0]
    every_layer = _actions(model, obs, noise, iv.patch(0, "text", None, text_b))
    layer_0 = _actions(model, obs, noise, iv.patch(0, "text", (0,), text_b[:1]))
    print("patch text (all layers / layer 0) vs B:", _maxdiff(every_layer, plain_b), _maxdiff(layer_0, plain_b))
    np.testing.assert_allclose(every_layer, plain_b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(layer_0, plain_b, atol=1e-5, rtol=0)
    # Control: patching a later layer only leaves the earlier layers reading prompt A.
    assert _maxdiff(_actions(model, obs, noise, iv.patch(0, "text", (2,), text_b[2:3])), plain_b) > 1e-4


def test_captures_show_the_steered_stream(model, obs, noise, plain_latents):
    v = np.random.default_rng(1).normal(size=64).astype(np.float32)
    ts = model.config.text_start
    out = _latents(model, obs, noise, iv.steer(0, "text", (2,), v, alpha=0.5))
    e0, base = out["expert_0_hidden_states"], plain_latents["expert_0_hidden_states"]
    np.testing.assert_array_equal(e0[:2], base[:2])  # layers before the edit
    np.testing.assert_array_equal(e0[2, :, :ts], base[2, :, :ts])  # image tokens entering layer 2
    np.testing.assert_allclose(e0[2, :, ts:], base[2, :, ts:] + 0.5 * v, atol=1e-5, rtol=0)
    assert _maxdiff(e0[3, :, :ts], base[3, :, :ts]) > 1e-4  # images read the steered text in layer 2
    np.testing.assert_array_equal(out["text_only_hidden_states"], e0[:, :, ts:])


def test_expert1_steer_acts_only_at_its_denoising_steps(model, obs, noise, plain_latents):
    v = np.random.default_rng(2).normal(size=64)
    out = _latents(model, obs, noise, iv.steer(1, "actions", (1,), v, alpha=1.0, denoise_steps=(1,)))
    base = plain_latents
    np.testing.assert_array_equal(out["expert_0_hidden_states"], base["expert_0_hidden_states"])  # prefix untouched
    np.testing.assert_array_equal(out["x_t"][:2], base["x_t"][:2])
    np.testing.assert_array_equal(out["v_t"][0], base["v_t"][0])
    assert _maxdiff(out["v_t"][1], base["v_t"][1]) > 1e-4
    e1, b1 = out["expert_1_hidden_states"], base["expert_1_hidden_states"]  # [S, L, B, Ts, W1]
    np.testing.assert_allclose(e1[1, 1, :, 1:], b1[1, 1, :, 1:] + v, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(e1[1, 1, :, 0], b1[1, 1, :, 0])  # the state token is not in the span


def test_knockout_of_selected_heads_and_expert1_queries(model, obs, noise, plain_latents):
    out = _latents(model, obs, noise, iv.knockout_attention("suffix", "text", layers=(1,), heads=(0, 3)))
    att, base = out["attention_to_text"], plain_latents["attention_to_text"]  # [S, L, B, heads, Ts]
    assert np.all(att[:, 1, :, [0, 3]] == 0.0)
    assert np.all(base[:, 1, :, [0, 3]] > 0.0)
    # The first step before layer 1 and the other heads of layer 1 are untouched (later steps see a changed x_t).
    np.testing.assert_array_equal(att[0, 0], base[0, 0])
    np.testing.assert_array_equal(att[0, 1, :, [1, 2, 4, 5, 6, 7]], base[0, 1, :, [1, 2, 4, 5, 6, 7]])
    np.testing.assert_array_equal(out["expert_0_hidden_states"], plain_latents["expert_0_hidden_states"])


def test_zeroing_every_head_equals_zeroing_the_attention_output(model, obs, noise, plain):
    # The output projection has no bias, so zero heads give a zero attention output.
    heads = _actions(model, obs, noise, iv.ablate(0, "all", (1,), "zero", stream="head_out"))
    attn = _actions(model, obs, noise, iv.ablate(0, "all", (1,), "zero", stream="attn_out"))
    np.testing.assert_allclose(heads, attn, atol=1e-6, rtol=0)
    assert _maxdiff(heads, plain) > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Compilation and validation


def test_new_values_do_not_recompile(model, obs, noise):
    rng = np.random.default_rng(3)
    sizes, outs = [], []
    for alpha in (1.0, 2.5, -1.0):
        outs.append(_actions(model, obs, noise, iv.steer(0, "text", (1,), rng.normal(size=64), alpha=alpha)))
        sizes.append(sampling.sample_jit._cache_size())
    assert sizes[0] == sizes[1] == sizes[2]  # one program for every value
    assert _maxdiff(outs[0], outs[1]) > 1e-5  # and the new values were used


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: iv.steer(0, "texts", (0,), np.zeros(64)), r"unknown token segment 'texts'.*Fix: use one of"),
        (lambda: iv.steer(0, "actions", (0,), np.zeros(64)), r"'actions' is a token segment of expert 1"),
        (lambda: iv.steer(0, "text", (4,), np.zeros(64)), r"layers \[4\] do not exist: this model has 4 layers"),
        (
            lambda: iv.steer(1, "actions", (0,), np.zeros(64), denoise_steps=(3,)),
            r"denoise_steps \[3\] do not exist: sampling runs 3 steps.*0\.\.2",
        ),
        (lambda: iv.steer(0, "text", (0,), np.zeros(64), denoise_steps=(0,)), r"expert 0 runs once"),
        (lambda: iv.steer(0, "text", (0,), np.zeros(63)), r"vector has shape \[63\].*\[64\] or \[1, 64\]"),
        (lambda: iv.patch(0, "text", (0, 1), np.zeros((1, 1, 48, 64))), r"values has shape \[1, 1, 48, 64\]"),
        (lambda: iv.patch(0, "text", (0,), np.zeros((1, 2, 48, 64))), r"\[1, 1, 48, 64\]"),  # batch is 1
        (lambda: iv.ablate(0, "text", None, "mean", np.zeros((4, 63))), r"mean has shape \[4, 63\]"),
        (lambda: iv.knockout_attention("all", "txt"), r"keys: unknown token segment 'txt'"),
        (lambda: iv.knockout_attention("all", "text", heads=(8,)), r"heads=\(8,\) do not exist"),
        (lambda: iv.knockout_attention((0, 5000), "text"), r"not a window of the 867 joint tokens"),
        (lambda: iv.steer(1, (0, 60), None, np.zeros(64)), r"not a window of expert 1's 51 tokens"),
    ],
)
def test_bad_requests_raise_before_compiling(model, obs, noise, make, message):
    before = sampling.sample_jit._cache_size()
    with pytest.raises(ValueError, match=message):
        _actions(model, obs, noise, make())
    with pytest.raises(ValueError, match=message):
        _latents(model, obs, noise, make())
    assert sampling.sample_jit._cache_size() == before


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"expert=2: pi0 has expert 0"):
        iv.steer(2, "text", None, np.zeros(64))
    with pytest.raises(ValueError, match=r"stream='resid' is not a stream point"):
        iv.patch(0, "text", None, np.zeros(1), stream="resid")
    with pytest.raises(ValueError, match=r"mode='half' is not valid"):
        iv.ablate(0, "text", None, "half")
    with pytest.raises(TypeError, match=r"intervention must be an openpi\.models\.intervention\.Intervention"):
        tiny_a_config().create(jax.random.key(0)).sample_actions(
            jax.random.key(0), random_observation(tiny_a_config(), 1), num_steps=1, intervention={"steer": 1}
        )


# ---------------------------------------------------------------------------------------------------------------------
# Unequal expert widths, batch 2


@pytest.mark.slow
def test_noops_with_unequal_widths_and_batch_2():
    config = pi0.Pi0Config(
        dtype="float32",
        paligemma_variant=gemma.Config(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=8),
        action_expert_variant=gemma.Config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=8),
        action_horizon=8,
        max_token_len=16,
        siglip_variant="mu/14",
        vocab_size=512,
    )
    model = config.create(jax.random.key(1))
    obs = random_observation(config, 2, seed=3)
    noise = np.random.default_rng(4).normal(size=(2, 8, config.action_dim)).astype(np.float32)
    plain = _actions(model, obs, noise)
    caps = _latents(model, obs, noise)
    noop = (
        iv.patch(0, "all", (1,), caps["expert_0_hidden_states"][1:])  # [1, B, Tp, 48]
        + iv.steer(1, "state", None, np.ones(32), alpha=0.0)
        + iv.ablate(1, (2, 3), (0,), "mean")  # one token: its own mean is itself
    )
    np.testing.assert_allclose(_actions(model, obs, noise, noop), plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"vector has shape \[48\].*\[32\]"):
        _actions(model, obs, noise, iv.steer(1, "state", None, np.ones(48)))
    knocked = _actions(model, obs, noise, iv.knockout_attention("suffix", "prefix"))
    assert _maxdiff(knocked, plain) > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Policy entry points


@pytest.fixture(scope="module")
def policy(tiny_a_dir):
    return policy_config.create_trained_policy(
        "pi0_libero_tiny", tiny_a_dir / "checkpoint", asset_id="test", sample_kwargs={"num_steps": NUM_STEPS}
    )


def _raw_obs(inputs):
    return {
        "observation/image": inputs["raw_observation_image"][0],
        "observation/wrist_image": inputs["raw_observation_wrist_image"][0],
        "observation/state": inputs["raw_observation_state"][0],
        "prompt": str(inputs["prompt"][0]),
    }


@pytest.mark.slow
def test_policy_entry_points(policy, tiny_a_inputs):
    obs, noise = _raw_obs(tiny_a_inputs), tiny_a_inputs["noise"][0]
    plain = policy.infer(obs, noise=noise)["actions"]
    noop = iv.steer(0, "text", (0,), np.ones(64), alpha=0.0)
    np.testing.assert_array_equal(policy.infer(obs, noise=noise, intervention=noop)["actions"], plain)
    knockout = iv.knockout_attention("all", "text")
    knocked = policy.infer(obs, noise=noise, intervention=knockout)["actions"]
    assert _maxdiff(knocked, plain) > 1e-4
    with_latents = policy.infer_with_latents(obs, noise=noise, capture=EVERYTHING, intervention=knockout)
    np.testing.assert_array_equal(with_latents["actions"], knocked)
    assert with_latents["latents"]["attention_to_text"].max() < 1e-30  # nothing reaches the text
    with pytest.raises(ValueError, match=r"values has shape"):
        policy.infer(obs, intervention=iv.patch(0, "text", (0,), np.zeros((1, 2, 48, 64))))
    with pytest.raises(ValueError, match="must not contain 'noise', 'capture' or 'intervention'"):
        type(policy)(policy.model, sample_kwargs={"intervention": knockout})


# ---------------------------------------------------------------------------------------------------------------------
# Language knockouts, step-restricted knockouts, own-mean over valid tokens, patch precision


@pytest.fixture(scope="module")
def obs_short(tiny_a_inputs):
    """The fixture's prompt one token shorter (its last valid token dropped): a different prompt length."""
    mask = np.array(tiny_a_inputs["tokenized_prompt_mask"])
    last = np.flatnonzero(mask[0])[-1]
    mask[0, last] = False
    tokens = np.where(mask, tiny_a_inputs["tokenized_prompt"], 0).astype(np.int32)
    return fixture_observation({**tiny_a_inputs, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask})


def test_language_knockout_removes_the_prompt_length_too(model, obs, obs_b, obs_short, noise):
    keys_only = iv.knockout_attention("all", "text")
    full = iv.knockout_language()
    keys_diff = _maxdiff(_actions(model, obs, noise, keys_only), _actions(model, obs_short, noise, keys_only))
    full_diff = _maxdiff(_actions(model, obs, noise, full), _actions(model, obs_short, noise, full))
    content_diff = _maxdiff(_actions(model, obs, noise, full), _actions(model, obs_b, noise, full))
    print(f"different-length prompts: text-keys knockout {keys_diff:.3g}, language knockout {full_diff}")
    assert keys_diff > 1e-2  # the positions still carry the length (measured 0.22)
    assert full_diff == 0.0 and content_diff == 0.0


def test_knockout_restricted_to_a_denoising_step_changes_only_later_steps(model, obs, noise, plain_latents):
    k = 1
    knock = iv.knockout_attention("suffix", "text", denoise_steps=(k,))
    out = _latents(model, obs, noise, knock)
    # x_t[s] is the input of step s: steps before k and step k's input are bit-identical, step k's velocity is not.
    np.testing.assert_array_equal(out["x_t"][: k + 1], plain_latents["x_t"][: k + 1])
    np.testing.assert_array_equal(out["v_t"][:k], plain_latents["v_t"][:k])
    assert _maxdiff(out["v_t"][k], plain_latents["v_t"][k]) > 1e-4
    assert _maxdiff(out["actions"], plain_latents["actions"]) > 1e-4
    assert "denoising step 0" in iv.describe(knock)["notes"][0]
    with pytest.raises(ValueError, match=r"include prefix tokens.*Fix: knock out expert-1 queries only"):
        _actions(model, obs, noise, iv.knockout_attention("all", "text", denoise_steps=(0,)))
    with pytest.raises(ValueError, match=r"denoise_steps \[3\] do not exist: sampling runs 3 steps"):
        _actions(model, obs, noise, iv.knockout_attention("suffix", "text", denoise_steps=(3,)))


def test_knockout_denoise_steps_in_the_json_file(tmp_path):
    from openpi.models import intervention_file

    path = tmp_path / "ko.json"
    path.write_text('{"ops": [{"op": "knockout", "queries": "suffix", "keys": "text", "denoise_steps": [2]}, '
                    '{"op": "knockout_language"}]}')  # fmt: skip
    loaded = intervention_file.load_intervention(path)
    want = iv.knockout_attention("suffix", "text", denoise_steps=(2,)) + iv.knockout_language()
    assert iv.describe(loaded) == iv.describe(want)
    assert iv.describe(loaded)["ops"][0]["denoise_steps"] == [2]


def test_own_mean_ablation_averages_valid_tokens_only(model, obs, noise, plain_latents):
    """The own mean of the text span (48 positions, most of them padding) is the mean over the valid ones."""
    layer, ts = 1, model.config.text_start
    valid = np.asarray(plain_latents["text_mask"][0])
    assert 0 < valid.sum() < valid.size  # the fixture's prompt leaves padding
    out = _latents(model, obs, noise, iv.ablate(0, "text", (layer,), "mean"))
    text_in = plain_latents["expert_0_hidden_states"][layer, 0, ts:]  # [48, W0]: layer 1's input, unchanged before it
    by_hand = text_in[valid].astype(np.float64).mean(axis=0)
    with_padding = text_in.astype(np.float64).mean(axis=0)
    edited = out["expert_0_hidden_states"][layer, 0, ts:]
    np.testing.assert_allclose(edited, np.broadcast_to(by_hand, edited.shape), rtol=0, atol=1e-5)
    gap = np.linalg.norm(with_padding - by_hand) / np.linalg.norm(by_hand)
    print(f"own mean with padding lies {gap:.2f} x its norm from the valid-token mean")
    assert gap > 0.1  # the definitions differ: the test can tell them apart


def test_float32_captures_patch_exactly_bf16_ones_do_not(model, obs, noise, plain):
    f32 = _latents(model, obs, noise, capture=CaptureSpec(expert_0="full", expert_1="full", dtype="float32"))
    bf16 = _latents(model, obs, noise, capture=CaptureSpec(expert_0="full", expert_1="full"))  # the default dtype
    exact = iv.patch(0, "all", None, f32["expert_0_hidden_states"]) + iv.patch(
        1, "all", None, f32["expert_1_hidden_states"]
    )
    assert "notes" not in iv.describe(exact)
    with pytest.warns(UserWarning, match="bfloat16.*CaptureSpec\\(dtype='float32'\\)"):
        rounded = iv.patch(0, "all", None, bf16["expert_0_hidden_states"]) + iv.patch(
            1, "all", None, bf16["expert_1_hidden_states"]
        )
    assert "bfloat16" in iv.describe(rounded)["notes"][0]
    exact_diff = _maxdiff(_actions(model, obs, noise, exact), plain)
    rounded_diff = _maxdiff(_actions(model, obs, noise, rounded), plain)
    print(f"own-value patch of every layer and token: float32 captures {exact_diff}, bf16 captures {rounded_diff:.3g}")
    assert exact_diff == 0.0
    assert rounded_diff > 1e-5


def test_post_attention_residual_is_editable(model, obs, noise, plain):
    """The fourth editable stream point: alpha 0 is bit-identical, alpha 1 an edit (same program: alpha is a leaf)."""
    v = np.random.default_rng(3).normal(size=64).astype(np.float32)
    zero = _actions(model, obs, noise, iv.steer(0, "text", (1,), v, alpha=0.0, stream="post_attn_residual"))
    one = _actions(model, obs, noise, iv.steer(0, "text", (1,), v, alpha=1.0, stream="post_attn_residual"))
    np.testing.assert_array_equal(zero, plain)
    assert _maxdiff(one, plain) > 1e-4
