"""`openpi.policies.batching`: padded batches through one jitted call equal one-observation calls (within rounding).

Measured on the tiny pi0 (random weights, capture in float32), batched vs one observation per call, max abs
difference over the requests:
  10 denoising steps, 5 observations padded to 8:
    float32: actions 1.2e-6, model_actions 1.2e-6, x_t 1.2e-6, v_t 4.9e-6, hidden-state means <= 2.4e-6;
    bfloat16: actions 1.6e-2, model_actions 1.7e-2, x_t 1.7e-2, v_t 7.3e-2, text hidden states 0.125 (one bf16
    ulp at magnitude 16-32, i.e. 2^-7 relative).
  3 denoising steps, 3 observations padded to 4 (this test): bfloat16 actions 2.7e-2, model_actions 3.4e-2.
The tolerances below are those figures with headroom. A batch of one is bit-identical to `Policy.infer_with_latents`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading

import numpy as np
import pytest
from model_inputs import raw_libero_observation

from openpi.models.capture import CaptureSpec
from openpi.policies import batching, policy_config

CAPTURE = CaptureSpec(expert_0="pooled", expert_1="pooled", text=True, trajectory=True, dtype="float32")
# Per model dtype: absolute tolerance of actions and model-space outputs, and tolerance of the latents relative to
# the key's largest magnitude (bf16 hidden states round to 8 significant bits); see the module docstring.
TOLERANCE = {"float32": 2e-5, "bfloat16": 0.1}
RELATIVE = {"float32": 1e-5, "bfloat16": 2**-5}


def _policy(dtype: str):
    preset = policy_config.get_preset("pi0_libero_tiny")
    preset = dataclasses.replace(preset, model_config=dataclasses.replace(preset.model_config, dtype=dtype))
    return policy_config.create_trained_policy(preset, sample_kwargs={"num_steps": 3})


def _observations(tiny_a_inputs, n: int) -> list[dict]:
    """`n` distinct raw observations: the fixture's, with shifted state and brightened images."""
    out = []
    for i in range(n):
        obs = dict(raw_libero_observation(tiny_a_inputs, 0))
        obs["observation/state"] = obs["observation/state"] + 0.05 * i
        obs["observation/image"] = np.clip(obs["observation/image"].astype(int) + 7 * i, 0, 255).astype(np.uint8)
        out.append(obs)
    return out


def _noises(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((50, 32)).astype(np.float32) for _ in range(n)]


def _max_diff(a: dict, b: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(max abs diff of actions / model_actions, max abs diff of each latent / the key's max magnitude)."""
    absolute = {
        k: float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max())
        for k in ("actions", "model_actions")
    }
    relative = {}
    for key, value in a["latents"].items():
        assert value.shape == b["latents"][key].shape, key
        ref = value.astype(np.float64)
        scale = max(float(np.abs(ref).max()), 1e-12)
        relative[key] = float(np.abs(ref - b["latents"][key].astype(np.float64)).max()) / scale
    return absolute, relative


def _check_close(a: dict, b: dict, dtype: str) -> None:
    absolute, relative = _max_diff(a, b)
    assert max(absolute.values()) <= TOLERANCE[dtype], absolute
    assert max(relative.values()) <= RELATIVE[dtype], relative


def test_bucket_size():
    assert [batching.bucket_size(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    with pytest.raises(ValueError, match="exceed the largest batch bucket 4"):
        batching.bucket_size(5, (1, 2, 4))
    with pytest.raises(ValueError, match="at least one request"):
        batching.bucket_size(0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_equals_one_per_call(dtype, tiny_a_inputs):
    policy = _policy(dtype)
    inference = batching.BatchedInference(policy, buckets=(1, 2, 4))
    obs, noises = _observations(tiny_a_inputs, 3), _noises(3)
    single = [policy.infer_with_latents(o, noise=z, capture=CAPTURE) for o, z in zip(obs, noises, strict=True)]
    batched = inference.run([batching.Request(o, z) for o, z in zip(obs, noises, strict=True)], CAPTURE)
    assert [b["policy_timing"]["padded_batch_size"] for b in batched] == [4, 4, 4]
    for s, b, z in zip(single, batched, noises, strict=True):
        np.testing.assert_array_equal(b["noise"], z)
        for key in ("tokenized_prompt", "text_mask", "segment_mask", "denoise_times"):
            np.testing.assert_array_equal(b["latents"][key], s["latents"][key])
        _check_close(s, b, dtype)
    # The rows are the requests' own, not copies of one: distinct observations give distinct actions.
    assert np.abs(batched[0]["actions"] - batched[2]["actions"]).max() > 10 * TOLERANCE["float32"]
    # A batch of one is the plain call, bit for bit (the exact mode of the parallel collection relies on it).
    one = inference.run([batching.Request(obs[1], noises[1])], CAPTURE)[0]
    np.testing.assert_array_equal(one["actions"], single[1]["actions"])
    for key, value in single[1]["latents"].items():
        np.testing.assert_array_equal(one["latents"][key], value)


def test_actions_only_and_drawn_noise(tiny_a_inputs):
    policy = _policy("float32")
    inference = batching.BatchedInference(policy, buckets=(1, 2))
    obs = _observations(tiny_a_inputs, 2)
    out = inference.run([batching.Request(obs[0]), batching.Request(obs[1])])
    assert "latents" not in out[0] and out[0]["actions"].shape == (50, 7)
    assert not np.array_equal(out[0]["noise"], out[1]["noise"])  # each request draws its own noise
    again = policy.infer(obs[1], noise=out[1]["noise"])
    np.testing.assert_allclose(again["actions"], out[1]["actions"], atol=TOLERANCE["float32"])


def test_batching_policy_gathers_concurrent_requests(tiny_a_inputs):
    policy = _policy("float32")
    obs, noises = _observations(tiny_a_inputs, 4), _noises(4)
    expected = [policy.infer_with_latents(o, noise=z, capture=CAPTURE) for o, z in zip(obs, noises, strict=True)]
    barrier = threading.Barrier(4)
    with batching.BatchingPolicy(policy, max_batch=4, max_wait_s=0.5) as front:

        def call(i):
            barrier.wait()
            return front.infer(obs[i], noise=noises[i], capture=CAPTURE)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(4)))

        async def two_async():
            return await asyncio.gather(*(front.infer_async(obs[i], noise=noises[i], capture=CAPTURE) for i in (0, 3)))

        from_asyncio = asyncio.run(two_async())
    assert max(r["policy_timing"]["batch_size"] for r in results) > 1  # they were gathered, not run one by one
    assert [r["policy_timing"]["batch_size"] for r in from_asyncio] == [2, 2]
    for r, e in zip(results + from_asyncio, expected + [expected[0], expected[3]], strict=True):
        _check_close(e, r, "float32")
    with pytest.raises(RuntimeError, match="closed"):
        front.submit(obs[0])


def test_batching_policy_errors_reach_the_caller(tiny_a_inputs):
    policy = _policy("float32")
    with pytest.raises(ValueError, match="max_batch=3 must be one of the bucket sizes"):
        batching.BatchingPolicy(policy, max_batch=3)
    obs = _observations(tiny_a_inputs, 1)[0]
    with batching.BatchingPolicy(policy, max_batch=2, max_wait_s=1.0) as front:
        bad = front.submit(obs, noise=np.zeros((3, 3), np.float32))
        good = front.submit(obs, noise=_noises(1)[0])  # gathered with the bad one, answered all the same
        with pytest.raises(ValueError, match="noise must have shape"):
            bad.result(timeout=120)
        np.testing.assert_allclose(
            good.result(timeout=120)["actions"], policy.infer(obs, noise=_noises(1)[0])["actions"], atol=2e-5
        )
