"""LoRA fine-tuned pi0 against upstream openpi's fixture (tests/data/pi0_lora_tiny_a), float32 on CPU; loading rules."""

import dataclasses
import json
import logging

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from model_inputs import fixture_observation, lora_tiny_a_config, tiny_a_config
from test_pi0 import _maxdiff
from test_policy import _raw_obs

from openpi.models import gemma, lora, pi0
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config

ATOL = 1e-4


def _restore(path):
    return _model.restore_params(path, restore_type=np.ndarray)


@pytest.fixture(scope="module")
def lora_params(lora_tiny_a_dir):
    return _restore(lora_tiny_a_dir / "checkpoint" / "params")


@pytest.fixture(scope="module")
def model(lora_params):
    return lora_tiny_a_config().load(lora_params)


@pytest.fixture(scope="module")
def obs(tiny_a_inputs):
    return fixture_observation(tiny_a_inputs)


@pytest.fixture(scope="module")
def actions(model, obs, tiny_a_inputs):
    return np.asarray(model.sample_actions(jax.random.key(0), obs, noise=tiny_a_inputs["noise"]))


def _flat(tree) -> dict[str, np.ndarray]:
    return flax.traverse_util.flatten_dict(tree, sep="/")


# ----------------------------------------------------------------------------------------------------------------
# Numerics against upstream


def test_actions_match_upstream_and_differ_from_base_as_upstream(actions, lora_tiny_a_expected):
    expected = lora_tiny_a_expected
    np.testing.assert_allclose(actions, expected["actions"], atol=ATOL, rtol=ATOL)
    # Upstream's LoRA effect (README_lora: 2.07): ours is the same, so the adapters are neither ignored nor mis-scaled.
    ours, theirs = (
        _maxdiff(actions, expected["actions_without_lora"]),
        _maxdiff(expected["actions"], expected["actions_without_lora"]),
    )
    assert ours > 1.0 and abs(ours - theirs) < 1e-3, (ours, theirs)


def test_trajectory_and_per_layer_inputs(model, obs, tiny_a_inputs, lora_tiny_a_expected):
    """Captures see the LoRA-adapted streams: every layer input of both experts, at every denoising step."""
    expected = lora_tiny_a_expected
    spec = CaptureSpec(expert_0="full", expert_1="full", trajectory=True, dtype="float32")
    latents = model.infer_with_latents(jax.random.key(0), obs, noise=tiny_a_inputs["noise"], capture=spec)
    np.testing.assert_allclose(latents["x_t"], expected["denoise_trajectory"], atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(latents["v_t"], expected["denoise_v_t"], atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(latents["denoise_times"], expected["denoise_times"])
    valid = expected["prefix_mask"][0]
    e0 = latents["expert_0_hidden_states"]
    assert e0.shape == expected["prefix_vlm_layer_inputs"].shape
    assert _maxdiff(e0[:, :, valid], expected["prefix_vlm_layer_inputs"][:, :, valid]) < ATOL
    np.testing.assert_allclose(
        latents["expert_1_hidden_states"], expected["denoise_expert_layer_inputs"], atol=ATOL, rtol=ATOL
    )


def test_prefix_output(model, obs, lora_tiny_a_expected):
    tokens, mask, ar = model.embed_prefix(obs)
    positions = np.cumsum(mask, axis=1) - 1
    (out, _), _, _ = model.config.llm().apply(
        {"params": model.params["PaliGemma"]["llm"]}, [tokens, None], positions, pi0.make_attn_mask(mask, ar)
    )
    valid = lora_tiny_a_expected["prefix_mask"][0]
    assert _maxdiff(out[:, valid], lora_tiny_a_expected["prefix_out"][:, valid]) < ATOL


@pytest.mark.slow
def test_loss_and_joint_pass(model, obs, tiny_a_inputs, lora_tiny_a_expected):
    expected = lora_tiny_a_expected
    rng = jax.random.key(int(tiny_a_inputs["loss_rng_seed"]))
    extra = model.compute_loss_with_extra(rng, obs, tiny_a_inputs["loss_actions"])
    loss = model.compute_loss(rng, obs, tiny_a_inputs["loss_actions"])
    np.testing.assert_allclose(loss, expected["loss"], atol=ATOL, rtol=ATOL)
    assert (
        abs(_maxdiff(loss, expected["loss_without_lora"]) - _maxdiff(expected["loss"], expected["loss_without_lora"]))
        < 1e-3
    )
    np.testing.assert_allclose(
        extra["expert_1_hidden_states_sum"], expected["loss_expert_layer_inputs"][:, 0], atol=ATOL, rtol=ATOL
    )


def test_zero_adapters_equal_base_model(lora_params, obs, tiny_a_inputs, lora_tiny_a_expected):
    """No-op edit: zero LoRA leaves in the LoRA config give the base config's (and upstream's) actions_without_lora."""
    flat = _flat(lora_params)
    zeroed = {p: np.zeros_like(v) if lora.is_lora_path(p) else v for p, v in flat.items()}
    base_only = {p: v for p, v in flat.items() if not lora.is_lora_path(p)}
    runs = {
        "lora config, zero adapters": lora_tiny_a_config().load(flax.traverse_util.unflatten_dict(zeroed, sep="/")),
        "base config, adapters removed": tiny_a_config().load(flax.traverse_util.unflatten_dict(base_only, sep="/")),
    }
    for name, m in runs.items():
        got = m.sample_actions(jax.random.key(0), obs, noise=tiny_a_inputs["noise"])
        assert _maxdiff(got, lora_tiny_a_expected["actions_without_lora"]) < ATOL, name


def test_policy_preset_is_one_line_change(lora_tiny_a_dir, tiny_a_dir, tiny_a_inputs, lora_tiny_a_expected):
    """End to end through upstream's pi0_libero transforms, with the tiny preset switched to the LoRA variants."""
    tiny = policy_config.get_preset("pi0_libero_tiny")
    preset = dataclasses.replace(tiny, model_config=lora_tiny_a_config())
    policy = policy_config.create_trained_policy(
        preset,
        lora_tiny_a_dir / "checkpoint",
        asset_id="physical-intelligence/libero",
        tokenizer_path=tiny_a_dir / "tokenizer.model",
    )
    out = policy.infer(_raw_obs(tiny_a_inputs), noise=tiny_a_inputs["noise"][0])
    np.testing.assert_allclose(out["actions"], lora_tiny_a_expected["policy_actions"][0], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------------------------
# Loading: never drop a leaf silently


def test_lora_checkpoint_into_base_config_raises_naming_variants(lora_params):
    with pytest.raises(ValueError, match=r"20 LoRA leaves") as err:
        tiny_a_config().load(lora_params)
    message = str(err.value)
    assert "PaliGemma/llm/layers/attn/attn_vec_einsum/lora_a" in message
    assert "paligemma_variant='dummy_lora_vlm'" in message and "action_expert_variant='dummy_lora_expert'" in message
    assert "gemma_2b_lora" in message


def test_lora_on_one_expert_only_names_that_expert(lora_params):
    """A config with LoRA on the VLM only still refuses the expert's adapters, and names only the expert's fix."""
    config = dataclasses.replace(tiny_a_config(), paligemma_variant="dummy_lora_vlm")
    with pytest.raises(ValueError, match=r"10 LoRA leaves .*_1/") as err:
        config.load(lora_params)
    assert "action_expert_variant='dummy_lora_expert'" in str(err.value)
    assert "paligemma_variant=" not in str(err.value)


def test_base_checkpoint_into_lora_config_raises(tiny_a_dir):
    with pytest.raises(ValueError, match=r"expects 20 LoRA leaves the params lack .*not a LoRA fine-tune"):
        lora_tiny_a_config().load(_restore(tiny_a_dir / "checkpoint" / "params"))


def test_unknown_leaf_is_dropped_with_a_warning(lora_params, caplog):
    params = {**lora_params, "extra_head": {"kernel": np.zeros((3, 2), np.float32)}}
    params["PaliGemma"] = {**params["PaliGemma"], "unused": np.zeros((4,), np.float32)}
    with caplog.at_level(logging.WARNING, logger="openpi.models.pi0_config"):
        model = lora_tiny_a_config().load(params)
    assert "extra_head" not in model.params
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Dropping 2 checkpoint leaves" in warnings[0]
    assert "extra_head/kernel" in warnings[0] and "PaliGemma/unused" in warnings[0]


def test_exact_tree_loads_without_warning(lora_params, caplog):
    with caplog.at_level(logging.WARNING):
        lora_tiny_a_config().load(lora_params)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nnx_value_style_checkpoint(lora_params, tmp_path):
    """openpi training writes nnx.State checkpoints (every path ends in `/value`); LoRA leaves are read the same way."""
    nnx_style = flax.traverse_util.unflatten_dict({(*p.split("/"), "value"): v for p, v in _flat(lora_params).items()})
    path = tmp_path / "params"
    ocp.PyTreeCheckpointer().save(path, ocp.args.PyTreeSave({"params": nnx_style}))
    restored = _flat(_restore(path))
    assert restored.keys() == _flat(lora_params).keys() and len(restored) == 70
    for p, v in _flat(lora_params).items():
        np.testing.assert_array_equal(restored[p], v)
    lora_tiny_a_config().load(flax.traverse_util.unflatten_dict(restored, sep="/"))


# ----------------------------------------------------------------------------------------------------------------
# Full-size tree and configuration


def test_eval_shape_full_size_lora_tree(lora_tiny_a_dir):
    reference = json.loads((lora_tiny_a_dir.parent / "pi0_lora_default_param_shapes.json").read_text())
    config = policy_config.get_preset("pi0_libero_low_mem_finetune").model_config
    model = jax.eval_shape(lambda: config.create(jax.random.key(0)))
    flat = {p: (list(v.shape), str(v.dtype)) for p, v in _flat(model.params).items()}
    assert flat == {k: (v["shape"], v["dtype"]) for k, v in reference["params"].items()}
    assert sum(np.prod(s) for s, _ in flat.values()) == reference["num_params"]
    lora_leaves = {p: s for p, (s, _) in flat.items() if lora.is_lora_path(p)}
    assert len(lora_leaves) == reference["num_lora_leaves"] == 20
    assert sum(np.prod(s) for s in lora_leaves.values()) == reference["num_lora_params"]


def test_variants_and_custom_config():
    vlm, expert = gemma.get_config("gemma_2b_lora"), gemma.get_config("gemma_300m_lora")
    assert (vlm.lora("attn").rank, vlm.lora("attn").alpha, vlm.lora("ffn").rank) == (16, 16.0, 16)
    assert (expert.lora("attn").rank, expert.lora("ffn").alpha) == (32, 32.0)
    assert dataclasses.replace(vlm, lora_configs=()) == gemma.get_config("gemma_2b")
    # A custom config: a mapping is accepted and stored hashably (configs are static jit arguments).
    custom = dataclasses.replace(gemma.get_config("dummy"), lora_configs={"attn": lora.LoRAConfig(rank=8, rslora=True)})
    assert custom.lora("ffn") is None and hash(custom) == hash(dataclasses.replace(custom))
    assert custom.lora("attn").scaling_value == pytest.approx(1 / np.sqrt(8))
    assert lora.LoRAConfig(rank=4, alpha=8.0).scaling_value == 2.0
    with pytest.raises(ValueError, match=r"Unknown LoRA kind\(s\) \['mlp'\]"):
        dataclasses.replace(custom, lora_configs={"mlp": lora.LoRAConfig(rank=2)})


@pytest.mark.parametrize(
    ("eqn", "eqn_a", "eqn_b"),
    [
        ("BTD,NDH->BTNH", "BTD,NDL->BTNL", "BTNL,NLH->BTNH"),  # q: per head
        ("BSD,2KDH->2BSKH", "BSD,2KDL->2BSKL", "2BSKL,2KLH->2BSKH"),  # kv: per slot and kv head
        ("BTNH,NHD->BTD", "BTNH,NHL->BTL", "BTL,NLD->BTD"),  # attn_vec: heads contracted, B summed over heads
    ],
)
def test_lora_equations(eqn, eqn_a, eqn_b):
    assert lora.LoRAConfig(rank=2).equations(eqn) == (eqn_a, eqn_b)
