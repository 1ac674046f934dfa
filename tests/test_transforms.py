"""Transforms, norm stats and the LIBERO mapping; the input pipeline is checked against the upstream fixture."""

import json

import numpy as np
import pytest

from openpi import transforms as T
from openpi.models import tokenizer as _tokenizer
from openpi.policies import libero_policy
from openpi.shared import normalize


@pytest.fixture(scope="module")
def fixture_stats(tiny_a_dir):
    return normalize.load(tiny_a_dir / "checkpoint" / "assets" / "test")


# ---------------------------------------------------------------------------------------------------------------------
# normalize.py


def test_norm_stats_load_fixture(fixture_stats):
    assert set(fixture_stats) == {"state", "actions"}
    assert fixture_stats["state"].mean.shape == (8,) and fixture_stats["actions"].std.shape == (7,)
    assert fixture_stats["state"].mean.dtype == np.float64
    assert fixture_stats["state"].std[0] == 0.1 and fixture_stats["actions"].q99[6] == 1.0


def test_norm_stats_save_load_roundtrip(tmp_path, fixture_stats):
    normalize.save(tmp_path / "a", fixture_stats)
    again = normalize.load(tmp_path / "a")
    for key in fixture_stats:
        for field in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(getattr(again[key], field), getattr(fixture_stats[key], field))
    normalize.save(tmp_path / "b", {"x": normalize.NormStats(mean=[1.0], std=[2.0])})
    data = json.loads((tmp_path / "b" / "norm_stats.json").read_text())
    assert data == {"norm_stats": {"x": {"mean": [1.0], "std": [2.0], "q01": None, "q99": None}}}


def test_norm_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"norm_stats\.json"):
        normalize.load(tmp_path)
    (tmp_path / "norm_stats.json").write_text('{"stats": {}}')
    with pytest.raises(ValueError, match='"norm_stats"'):
        normalize.load(tmp_path)
    (tmp_path / "norm_stats.json").write_text('{"norm_stats": {"state": {"mean": [0.0]}}}')
    with pytest.raises(ValueError, match=r"'state'.*std"):
        normalize.load(tmp_path)
    with pytest.raises(ValueError, match="same shape"):
        normalize.NormStats(mean=[0.0, 1.0], std=[1.0])
    with pytest.raises(ValueError, match="together"):
        normalize.NormStats(mean=[0.0], std=[1.0], q01=[0.0])


# ---------------------------------------------------------------------------------------------------------------------
# Normalize / Unnormalize


def _stats(mean, std, q01=None, q99=None):
    return normalize.NormStats(mean=mean, std=std, q01=q01, q99=q99)


def test_zscore_arithmetic():
    stats = {"state": _stats([1.0, 2.0, 3.0], [2.0, 4.0, 0.5])}
    out = T.Normalize(stats)({"state": np.array([3.0, 2.0])})  # sliced to the data's 2 dims
    np.testing.assert_allclose(out["state"], [(3 - 1) / (2 + 1e-6), 0.0], rtol=0, atol=0)


def test_quantile_arithmetic():
    stats = {"actions": _stats([0.0, 0.0], [1.0, 1.0], q01=[-2.0, 0.0], q99=[2.0, 10.0])}
    out = T.Normalize(stats, use_quantiles=True)({"actions": np.array([[2.0, 5.0]])})
    np.testing.assert_allclose(out["actions"], [[4 / (4 + 1e-6) * 2 - 1, 5 / (10 + 1e-6) * 2 - 1]], atol=0, rtol=0)


def test_normalize_unnormalize_roundtrip(fixture_stats):
    rng = np.random.default_rng(0)
    data = {"state": rng.normal(size=(8,)), "actions": rng.normal(size=(50, 7))}
    for q in (False, True):
        back = T.Unnormalize(fixture_stats, use_quantiles=q)(T.Normalize(fixture_stats, use_quantiles=q)(data))
        for key in data:
            np.testing.assert_allclose(back[key], data[key], atol=1e-12)


def test_unnormalize_pads_stats():
    stats = {"actions": _stats([10.0], [2.0], q01=[0.0], q99=[4.0])}
    x = np.array([[1.0, 5.0, -3.0]])
    z = T.Unnormalize(stats)({"actions": x})["actions"]
    # Dim 0: x * (2 + 1e-6) + 10; dims past the stats: mean 0, std 1 -> x * (1 + 1e-6).
    np.testing.assert_allclose(z, [[1 * (2 + 1e-6) + 10, 5 * (1 + 1e-6), -3 * (1 + 1e-6)]], atol=0, rtol=0)
    q = T.Unnormalize(stats, use_quantiles=True)({"actions": x})["actions"]
    np.testing.assert_allclose(q, [[(1 + 1) / 2 * (4 + 1e-6), 5.0, -3.0]], atol=0, rtol=0)


def test_normalize_strictness_and_errors(fixture_stats):
    # Non-strict Normalize skips absent keys (no actions at inference).
    out = T.Normalize(fixture_stats)({"state": np.zeros(8)})
    assert set(out) == {"state"}
    with pytest.raises(KeyError, match="actions"):
        T.Normalize(fixture_stats, strict=True)({"state": np.zeros(8)})
    with pytest.raises(KeyError, match="Unnormalize needs the key 'state'"):
        T.Unnormalize(fixture_stats)({"actions": np.zeros((50, 32))})
    with pytest.raises(ValueError, match="have 8 dims but the data has 32"):
        T.Normalize(fixture_stats)({"state": np.zeros(32)})
    with pytest.raises(ValueError, match="q01/q99"):
        T.Normalize({"state": _stats([0.0], [1.0])}, use_quantiles=True)({"state": np.zeros(1)})
    assert T.Normalize(None)({"a": 1}) == {"a": 1}


def test_normalize_nested_and_flat_keys():
    stats = {"observation/state": _stats([1.0], [1.0])}
    nested = T.Normalize(stats)({"observation": {"state": np.array([3.0]), "other": 1}})
    np.testing.assert_allclose(nested["observation"]["state"], [2 / (1 + 1e-6)])
    assert nested["observation"]["other"] == 1
    flat = T.Normalize(stats)({"observation/state": np.array([3.0])})
    np.testing.assert_allclose(flat["observation/state"], [2 / (1 + 1e-6)])


def test_normalize_does_not_mutate_input(fixture_stats):
    state = np.ones(8)
    data = {"state": state}
    T.Normalize(fixture_stats)(data)
    assert data["state"] is state and (state == 1).all()


# ---------------------------------------------------------------------------------------------------------------------
# Delta / absolute actions, padding, prompt


def test_make_bool_mask():
    assert T.make_bool_mask(6, -1) == (True,) * 6 + (False,)
    assert T.make_bool_mask(-2, 1) == (False, False, True)


def test_delta_absolute_actions():
    mask = T.make_bool_mask(6, -1)
    state = np.arange(8, dtype=np.float64)
    actions = np.ones((3, 7))
    delta = T.DeltaActions(mask)({"state": state, "actions": actions})
    expected = np.ones((3, 7))
    expected[:, :6] -= np.arange(6)
    np.testing.assert_array_equal(delta["actions"], expected)
    np.testing.assert_array_equal(actions, np.ones((3, 7)))  # input untouched
    back = T.AbsoluteActions(mask)(delta)
    np.testing.assert_array_equal(back["actions"], actions)
    # No actions (inference): no-op.
    assert T.DeltaActions(mask)({"state": state}) == {"state": state}


def test_pad_states_and_actions():
    out = T.PadStatesAndActions(32)({"state": np.ones(8), "actions": np.ones((50, 7))})
    assert out["state"].shape == (32,) and out["actions"].shape == (50, 32)
    assert out["state"][8:].sum() == 0 and out["actions"][:, 7:].sum() == 0
    assert T.PadStatesAndActions(32)({"state": np.ones(8)}).keys() == {"state"}
    with pytest.raises(ValueError, match="wider than the model's action_dim"):
        T.PadStatesAndActions(4)({"state": np.ones(8)})


def test_prompt_transforms(tiny_a_dir):
    assert T.InjectDefaultPrompt("a")({})["prompt"] == "a"
    assert T.InjectDefaultPrompt("a")({"prompt": "b"})["prompt"] == "b"
    assert T.InjectDefaultPrompt(None)({}) == {}
    tok = _tokenizer.PaligemmaTokenizer(48, tiny_a_dir / "tokenizer.model")
    out = T.TokenizePrompt(tok)({"prompt": np.asarray("put the bowl"), "state": 1})
    assert "prompt" not in out and out["state"] == 1
    np.testing.assert_array_equal(out["tokenized_prompt"], tok.tokenize("put the bowl")[0])
    with pytest.raises(ValueError, match="default_prompt"):
        T.TokenizePrompt(tok)({"state": 1})


def test_resize_images_noop_and_resize():
    img = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    out = T.ResizeImages(224, 224)({"image": {"a": img}})
    np.testing.assert_array_equal(out["image"]["a"], img)
    small = T.ResizeImages(224, 224)({"image": {"a": img[:112]}})["image"]["a"]
    # 112x224 -> fits as 112x224, padded by 56 rows of zeros on top and bottom.
    assert small.shape == (224, 224, 3) and small[:56].sum() == 0 and small[-56:].sum() == 0


def test_compose_flattens():
    a, b = T.InjectDefaultPrompt("x"), T.PadStatesAndActions(4)
    c = T.compose([T.compose([a]), b])
    assert c.transforms == (a, b)
    out = c({"state": np.ones(2)})
    assert out["prompt"] == "x" and out["state"].tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------------------------------------------------------------
# LIBERO mapping


def test_libero_inputs_shapes_and_masks():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    obs = {"observation/image": img, "observation/wrist_image": img, "observation/state": np.ones(8), "prompt": "p"}
    out = libero_policy.LiberoInputs("pi0")(obs)
    assert set(out) == {"state", "image", "image_mask", "prompt"}
    assert list(out["image"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert out["image"]["right_wrist_0_rgb"].shape == img.shape and out["image"]["right_wrist_0_rgb"].sum() == 0
    assert [bool(m) for m in out["image_mask"].values()] == [True, True, False]
    fast = libero_policy.LiberoInputs("pi0_fast")(obs)
    assert bool(fast["image_mask"]["right_wrist_0_rgb"])
    with pytest.raises(ValueError, match="model_type"):
        libero_policy.LiberoInputs("pi1")
    with pytest.raises(KeyError, match="observation/wrist_image"):
        libero_policy.LiberoInputs()({"observation/image": img, "observation/state": np.ones(8)})


def test_libero_parse_image_float_and_chw():
    chw = np.full((3, 4, 5), 0.5, dtype=np.float32)
    out = libero_policy.parse_image(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and (out == 127).all()  # int(255 * 0.5) = 127


def test_libero_outputs():
    out = libero_policy.LiberoOutputs()({"actions": np.arange(50 * 32.0).reshape(50, 32), "state": np.zeros(32)})
    assert set(out) == {"actions"} and out["actions"].shape == (50, 7)
    np.testing.assert_array_equal(out["actions"][1], np.arange(32, 39))


# ---------------------------------------------------------------------------------------------------------------------
# The whole pi0 LIBERO input pipeline on the fixture's raw observation


def test_input_pipeline_reproduces_fixture(tiny_a_dir, tiny_a_inputs, fixture_stats):
    tok = _tokenizer.PaligemmaTokenizer(48, tiny_a_dir / "tokenizer.model")
    pipeline = T.compose(
        [
            T.InjectDefaultPrompt(None),
            libero_policy.LiberoInputs("pi0"),
            T.DeltaActions(T.make_bool_mask(6, -1)),
            T.Normalize(fixture_stats),
            T.InjectDefaultPrompt(None),
            T.ResizeImages(224, 224),
            T.TokenizePrompt(tok),
            T.PadStatesAndActions(32),
        ]
    )
    raw = {
        "observation/image": tiny_a_inputs["raw_observation_image"][0],
        "observation/wrist_image": tiny_a_inputs["raw_observation_wrist_image"][0],
        "observation/state": tiny_a_inputs["raw_observation_state"][0],
        "prompt": str(tiny_a_inputs["prompt"][0]),
    }
    out = pipeline(raw)
    np.testing.assert_allclose(out["state"].astype(np.float32), tiny_a_inputs["state"][0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["tokenized_prompt"], tiny_a_inputs["tokenized_prompt"][0])
    np.testing.assert_array_equal(out["tokenized_prompt_mask"], tiny_a_inputs["tokenized_prompt_mask"][0])
    for cam in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"):
        image = out["image"][cam]
        assert image.dtype == np.uint8
        as_float = image.astype(np.float32) / 255.0 * 2.0 - 1.0
        np.testing.assert_allclose(as_float, tiny_a_inputs[f"image_{cam}"][0], atol=1e-6, rtol=0)
        assert bool(out["image_mask"][cam]) == bool(tiny_a_inputs[f"image_mask_{cam}"][0])
