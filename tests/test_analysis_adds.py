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
