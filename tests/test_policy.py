"""Downloads, presets, `create_trained_policy` and `Policy`; end to end against upstream's `policy_actions`."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import uuid

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from model_inputs import raw_libero_observation

from openpi import transforms as T
from openpi.models.capture import CaptureSpec
from openpi.policies import libero_policy, policy_config
from openpi.policies import policy as _policy
from openpi.shared import download, normalize

HAVE_PI0 = importlib.util.find_spec("openpi.models.pi0") is not None
needs_pi0 = pytest.mark.skipif(not HAVE_PI0, reason="openpi.models.pi0 is not in the tree yet")


# ---------------------------------------------------------------------------------------------------------------------
# download.maybe_download


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_download_local_paths(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert download.maybe_download(f) == f
    assert download.maybe_download(str(tmp_path)) == tmp_path
    assert download.maybe_download(f"file://{f}") == f  # file:// is local: returned, not copied
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download.maybe_download(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download.maybe_download(f"file://{tmp_path}/missing")


def test_download_memory_file_and_reuse(memfs, tmp_path):
    fs, root = memfs
    fs.pipe(f"{root}/tok.model", b"v1")
    url = f"memory://{root.strip('/')}/tok.model"
    local = download.maybe_download(url, cache_dir=tmp_path)
    assert local == tmp_path / root.strip("/") / "tok.model"
    assert local.read_bytes() == b"v1"
    fs.pipe(f"{root}/tok.model", b"v2")
    assert download.maybe_download(url, cache_dir=tmp_path).read_bytes() == b"v1"  # cached copy reused
    assert download.maybe_download(url, cache_dir=tmp_path, force=True).read_bytes() == b"v2"
    # No temporary leftovers next to the copy.
    assert [p.name for p in local.parent.iterdir() if ".tmp-" in p.name] == []


def test_download_memory_directory(memfs, tmp_path, tiny_a_dir):
    fs, root = memfs
    src = tiny_a_dir / "checkpoint"
    for p in src.rglob("*"):
        if p.is_file():
            fs.pipe(f"{root}/ckpt/{p.relative_to(src).as_posix()}", p.read_bytes())
    local = download.maybe_download(f"memory://{root.strip('/')}/ckpt", cache_dir=tmp_path)
    copied = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    original = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert copied == original
    for rel in original:
        assert (local / rel).read_bytes() == (src / rel).read_bytes()
    # The copied checkpoint is usable: norm stats load from it.
    assert set(normalize.load(local / "assets" / "test")) == {"state", "actions"}


def test_download_concurrent_callers_share_one_copy(memfs, tmp_path):
    import concurrent.futures

    fs, root = memfs
    for i in range(20):
        fs.pipe(f"{root}/d/f{i}.bin", bytes([i]) * 1000)
    url = f"memory://{root.strip('/')}/d"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: download.maybe_download(url, cache_dir=tmp_path), range(8)))
    assert len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].iterdir()) == sorted(f"f{i}.bin" for i in range(20))
    assert [p.name for p in paths[0].parent.iterdir() if ".tmp-" in p.name] == []


def test_download_cache_dir_from_env(memfs, tmp_path, monkeypatch):
    fs, root = memfs
    fs.pipe(f"{root}/x.json", b"{}")
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "home"))
    local = download.maybe_download(f"memory://{root.strip('/')}/x.json")
    assert local.is_relative_to(tmp_path / "home")


def test_download_missing_remote(memfs, tmp_path):
    _, root = memfs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download.maybe_download(f"memory://{root.strip('/')}/nope", cache_dir=tmp_path)
    assert not (tmp_path / root.strip("/") / "nope").exists()


def test_download_gs_needs_gcsfs(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        download.importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"openpi-latents\[gcs\]"):
        download.maybe_download("gs://big_vision/paligemma_tokenizer.model", cache_dir=tmp_path)


def test_download_gs_is_anonymous(monkeypatch, tmp_path, memfs):
    """gs:// goes through fsspec.filesystem("gs", token="anon"); a memory filesystem stands in for GCS here."""
    fs, root = memfs
    fs.pipe(f"{root}/tok.model", b"paligemma")
    calls = []

    class FakeGCS(MemoryFileSystem):
        """Shares the memory store; strips gs:// as gcsfs does (gs://bucket/path -> bucket/path)."""

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("gs://"))

    def fake_filesystem(protocol, **kwargs):
        calls.append((protocol, kwargs))
        return FakeGCS()

    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(download.fsspec, "filesystem", fake_filesystem)
    # gs://<bucket>/<path> maps to the memory path /<bucket>/<path>.
    local = download.maybe_download(f"gs://{root.strip('/')}/tok.model", cache_dir=tmp_path)
    assert calls == [("gs", {"token": "anon"})]
    assert local.read_bytes() == b"paligemma"


# ---------------------------------------------------------------------------------------------------------------------
# presets and checkpoint resolution


def test_get_preset_lists_presets():
    assert policy_config.get_preset("pi0_libero").asset_id == "physical-intelligence/libero"
    assert policy_config.get_preset("pi0_libero").default_checkpoint == "gs://openpi-assets/checkpoints/pi0_libero"
    assert policy_config.get_preset("pi0_libero").model_config.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"pi0_libero.*pi0_libero_tiny"):
        policy_config.get_preset("pi0_droid")


def test_tiny_preset_ships_its_assets():
    preset = policy_config.get_preset("pi0_libero_tiny")
    assert preset.default_checkpoint is None
    assert pathlib.Path(preset.tokenizer_path).is_file()
    stats = normalize.load(preset.default_norm_stats_dir)
    np.testing.assert_array_equal(stats["state"].mean, np.zeros(8))
    np.testing.assert_array_equal(stats["state"].std, np.ones(8))
    np.testing.assert_array_equal(stats["actions"].mean, np.zeros(7))
    np.testing.assert_array_equal(stats["actions"].std, np.ones(7))


def test_missing_asset_error_lists_existing(tiny_a_dir, tmp_path):
    ckpt = tiny_a_dir / "checkpoint"
    with pytest.raises(FileNotFoundError, match=r"physical-intelligence/libero.*Asset ids in this checkpoint: 'test'"):
        policy_config.load_checkpoint_norm_stats(ckpt, "physical-intelligence/libero")
    # Nested asset ids (with '/') are listed as such.
    shutil.copytree(ckpt / "assets", tmp_path / "assets")
    normalize.save(tmp_path / "assets" / "physical-intelligence" / "libero", normalize.load(ckpt / "assets" / "test"))
    assert policy_config.available_asset_ids(tmp_path) == ["physical-intelligence/libero", "test"]
    with pytest.raises(FileNotFoundError, match="'physical-intelligence/libero', 'test'"):
        policy_config.load_checkpoint_norm_stats(tmp_path, "other")


def test_create_policy_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Checkpoint .* not found"):
        policy_config.create_trained_policy("pi0_libero_tiny", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no params/ subdirectory"):
        policy_config.create_trained_policy("pi0_libero_tiny", tmp_path)


def test_create_policy_missing_asset_checked_before_restore(tiny_a_dir):
    with pytest.raises(FileNotFoundError, match="Asset ids in this checkpoint: 'test'"):
        policy_config.create_trained_policy("pi0_libero_tiny", tiny_a_dir / "checkpoint")


# ---------------------------------------------------------------------------------------------------------------------
# Policy plumbing with a stand-in model (explainable arithmetic)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FakeConfig:
    action_horizon: int = 4
    action_dim: int = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FakeModel:
    """actions = noise + state (broadcast over the horizon); noise ~ N(0, 1) from rng if not given."""

    scale: jax.Array
    config: _FakeConfig = dataclasses.field(default_factory=_FakeConfig, metadata={"static": True})

    def sample_actions(self, rng, observation, *, num_steps=10, noise=None):
        if noise is None:
            shape = (observation.state.shape[0], self.config.action_horizon, self.config.action_dim)
            noise = jax.random.normal(rng, shape)
        return noise * self.scale + observation.state[:, None, :]

    def infer_with_latents(self, rng, observation, *, num_steps=10, noise=None, capture=CaptureSpec()):
        actions = self.sample_actions(rng, observation, num_steps=num_steps, noise=noise)
        return {
            "actions": actions,
            "tokenized_prompt": observation.tokenized_prompt,
            "text_mask": observation.tokenized_prompt_mask,
            "denoise_times": jnp.ones((num_steps,)),
        }


def _fake_policy(tiny_a_dir, stats, **kwargs):
    preset = policy_config.get_preset("pi0_libero_tiny")
    from openpi.models.tokenizer import PaligemmaTokenizer

    tok = PaligemmaTokenizer(48, tiny_a_dir / "tokenizer.model")
    inputs, outputs = policy_config.make_transforms(preset, stats, tok)
    return _policy.Policy(_FakeModel(jnp.float32(1.0)), transforms=inputs, output_transforms=outputs, **kwargs)


def _raw_obs(tiny_a_inputs):
    return raw_libero_observation(tiny_a_inputs)


def test_policy_infer_arithmetic(tiny_a_dir, tiny_a_inputs):
    stats = normalize.load(tiny_a_dir / "checkpoint" / "assets" / "test")
    policy = _fake_policy(tiny_a_dir, stats)
    noise = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
    out = policy.infer(_raw_obs(tiny_a_inputs), noise=noise)
    assert set(out) == {"actions", "state", "policy_timing"}
    assert out["actions"].shape == (4, 7) and out["actions"].dtype == np.float64
    # The model-input state is the fixture's normalized, padded state.
    np.testing.assert_allclose(out["state"], tiny_a_inputs["state"][0], atol=1e-6)
    # Expected: unnormalize(noise + state_n) + raw state on dims 0..5.
    z = noise[:, :7].astype(np.float64) + out["state"][:7].astype(np.float64)
    expected = z * (stats["actions"].std + 1e-6) + stats["actions"].mean
    raw_state = out["state"][:6] * (stats["state"].std[:6] + 1e-6) + stats["state"].mean[:6]
    expected[:, :6] += raw_state
    np.testing.assert_allclose(out["actions"], expected, atol=1e-5)
    assert out["policy_timing"]["infer_ms"] >= 0
    # Noise of shape [1, H, AD] is accepted too; a wrong shape is a clear error.
    np.testing.assert_array_equal(policy.infer(_raw_obs(tiny_a_inputs), noise=noise[None])["actions"], out["actions"])
    with pytest.raises(ValueError, match=r"noise must have shape \[action_horizon, action_dim\] = \[4, 32\]"):
        policy.infer(_raw_obs(tiny_a_inputs), noise=noise[:, :7])


def test_policy_infer_with_latents_noise_and_rng(tiny_a_dir, tiny_a_inputs):
    stats = normalize.load(tiny_a_dir / "checkpoint" / "assets" / "test")
    obs = _raw_obs(tiny_a_inputs)
    a = _fake_policy(tiny_a_dir, stats, rng=jax.random.key(3)).infer_with_latents(obs)
    b = _fake_policy(tiny_a_dir, stats, rng=jax.random.key(3)).infer_with_latents(obs)
    assert {"actions", "state", "policy_timing", "latents", "noise", "model_actions"} <= set(a)
    assert a["noise"].shape == (4, 32) and a["model_actions"].shape == (4, 32)
    np.testing.assert_array_equal(a["noise"], b["noise"])  # same seed -> same drawn noise
    np.testing.assert_allclose(a["model_actions"], a["noise"] + a["state"][None], atol=1e-6)
    # Latents keep the batch axis and are numpy.
    assert a["latents"]["tokenized_prompt"].shape == (1, 48)
    np.testing.assert_array_equal(a["latents"]["tokenized_prompt"][0], tiny_a_inputs["tokenized_prompt"][0])
    assert isinstance(a["latents"]["text_mask"], np.ndarray)
    # Rerunning with the returned noise (a counterfactual rerun) reproduces the actions; infer agrees.
    policy = _fake_policy(tiny_a_dir, stats, rng=jax.random.key(9))
    c = policy.infer_with_latents(obs, noise=a["noise"])
    np.testing.assert_array_equal(c["actions"], a["actions"])
    np.testing.assert_array_equal(policy.infer(obs, noise=a["noise"])["actions"], a["actions"])
    # Without noise, consecutive calls draw fresh noise.
    d1, d2 = policy.infer_with_latents(obs), policy.infer_with_latents(obs)
    assert not np.array_equal(d1["noise"], d2["noise"])


def test_policy_rejects_noise_in_sample_kwargs():
    with pytest.raises(ValueError, match="sample_kwargs must not contain"):
        _policy.Policy(_FakeModel(jnp.float32(1.0)), sample_kwargs={"noise": 0})


# ---------------------------------------------------------------------------------------------------------------------
# End to end with the real pi0 (needs openpi/models/pi0.py)


@pytest.fixture(scope="module")
def fixture_policy(tiny_a_dir):
    return policy_config.create_trained_policy(
        "pi0_libero_tiny", tiny_a_dir / "checkpoint", asset_id="test", sample_kwargs={"num_steps": 10}
    )


@needs_pi0
def test_end_to_end_policy_actions(fixture_policy, tiny_a_inputs, tiny_a_expected):
    obs = _raw_obs(tiny_a_inputs)
    out = fixture_policy.infer(obs, noise=tiny_a_inputs["noise"][0])
    assert out["actions"].shape == (50, 7) and out["actions"].dtype == np.float64
    np.testing.assert_allclose(out["actions"], tiny_a_expected["policy_actions"][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["state"], tiny_a_inputs["state"][0], atol=1e-6, rtol=0)


@needs_pi0
def test_end_to_end_with_latents(fixture_policy, tiny_a_inputs, tiny_a_expected):
    obs = _raw_obs(tiny_a_inputs)
    capture = CaptureSpec(expert_0="pooled", expert_1="pooled", text=True, trajectory=True, dtype="float32")
    out = fixture_policy.infer_with_latents(obs, noise=tiny_a_inputs["noise"][0], capture=capture)
    np.testing.assert_allclose(out["actions"], tiny_a_expected["policy_actions"][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["model_actions"], tiny_a_expected["actions"][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(out["noise"], tiny_a_inputs["noise"][0])
    latents = out["latents"]
    np.testing.assert_array_equal(latents["tokenized_prompt"], tiny_a_inputs["tokenized_prompt"])
    np.testing.assert_array_equal(latents["text_mask"], tiny_a_inputs["tokenized_prompt_mask"])
    np.testing.assert_allclose(latents["x_t"], tiny_a_expected["denoise_trajectory"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(latents["denoise_times"], tiny_a_expected["denoise_times"], atol=1e-6)


@needs_pi0
def test_tiny_preset_random_params_runs_without_download(tiny_a_inputs):
    policy = policy_config.create_trained_policy("pi0_libero_tiny", sample_kwargs={"num_steps": 2})
    out = policy.infer(_raw_obs(tiny_a_inputs))
    assert out["actions"].shape == (50, 7) and np.isfinite(out["actions"]).all()
    assert policy.metadata["checkpoint"].startswith("random")
    # Identity-like stats: the actions are the model output (first 7 dims), plus the raw state on dims 0..5.
    raw = tiny_a_inputs["raw_observation_state"][0].astype(np.float64)
    model_actions = (out["actions"] - np.concatenate([raw[:6], [0.0]])) / (1 + 1e-6)
    assert np.abs(model_actions).max() < 100


def test_policy_config_json_metadata_is_serializable(tiny_a_dir):
    # Metadata of a policy is plain data (it goes into run manifests).
    stats = normalize.load(tiny_a_dir / "checkpoint" / "assets" / "test")
    policy = _fake_policy(tiny_a_dir, stats, metadata={"preset": "x"})
    assert json.loads(json.dumps(policy.metadata)) == {"preset": "x"}


def test_transform_order_matches_openpi(tiny_a_dir):
    stats = normalize.load(tiny_a_dir / "checkpoint" / "assets" / "test")
    from openpi.models.tokenizer import PaligemmaTokenizer

    preset = policy_config.get_preset("pi0_libero_tiny")
    inputs, outputs = policy_config.make_transforms(
        preset, stats, PaligemmaTokenizer(48, tiny_a_dir / "tokenizer.model")
    )
    assert [type(t).__name__ for t in inputs] == [
        "InjectDefaultPrompt",
        "LiberoInputs",
        "DeltaActions",
        "Normalize",
        "InjectDefaultPrompt",
        "ResizeImages",
        "TokenizePrompt",
        "PadStatesAndActions",
    ]
    assert [type(t).__name__ for t in outputs] == ["Unnormalize", "AbsoluteActions", "LiberoOutputs"]
    assert inputs[3].use_quantiles is False and isinstance(outputs[2], libero_policy.LiberoOutputs)
    assert inputs[2].mask == T.make_bool_mask(6, -1)


@needs_pi0
def test_bf16_deployment_path(tiny_a_dir, tiny_a_inputs, tiny_a_expected):
    """bf16 configs restore every param as bf16 (as upstream serves); actions are near upstream's bf16 policy.

    bf16 rounding makes exact agreement impossible; the fixture README puts bf16-vs-f32 at up to 0.05.
    """
    preset = policy_config.get_preset("pi0_libero_tiny")
    preset = dataclasses.replace(preset, model_config=dataclasses.replace(preset.model_config, dtype="bfloat16"))
    policy = policy_config.create_trained_policy(preset, tiny_a_dir / "checkpoint", asset_id="test")
    assert {str(x.dtype) for x in jax.tree.leaves(policy.model.params)} == {"bfloat16"}
    out = policy.infer(_raw_obs(tiny_a_inputs), noise=tiny_a_inputs["noise"][0])
    np.testing.assert_allclose(out["actions"], tiny_a_expected["policy_actions_bf16"][0], atol=5e-2, rtol=0)
