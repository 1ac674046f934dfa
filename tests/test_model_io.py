"""Observation, preprocessing, resize-with-pad, restore_params and check_params_match."""

import pathlib

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from PIL import Image

from openpi.models import model as _model
from openpi.shared import image_tools


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _save(path: pathlib.Path, tree) -> pathlib.Path:
    ocp.PyTreeCheckpointer().save(path, ocp.args.PyTreeSave(tree))
    return path


# ----------------------------------------------------------------------------------------------------------------
# restore_params


@pytest.fixture(scope="module")
def fixture_params_dir(tiny_a_dir) -> pathlib.Path:
    return tiny_a_dir / "checkpoint" / "params"


def _read_with_tensorstore(params_dir: pathlib.Path, dotted: str) -> np.ndarray:
    # Independent reader (spec section 12): each leaf is a zarr v2 array under key "params.<dotted path>" in OCDBT.
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir.resolve()}", "path": f"params.{dotted}"},
    }
    return ts.open(spec, read=True).result().read().result()


def test_restore_pure_dict_fixture(fixture_params_dir):
    params = _model.restore_params(fixture_params_dir, restore_type=np.ndarray)
    flat = _flat(params)
    assert len(flat) == 50  # the full pi0 tree has 50 leaves whatever the sizes
    assert set(params) == {"PaliGemma", "state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out",
                           "action_out_proj"}  # fmt: skip
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in flat.values())
    # SigLIP's `value` module survives: only a trailing "value" on *every* path is stripped.
    value_kernel = "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/kernel"
    assert flat[value_kernel].shape == (1, 32, 2, 16)
    assert flat["PaliGemma/img/embedding/kernel"].shape == (14, 14, 3, 32)
    for path in (value_kernel, "action_out_proj/bias", "PaliGemma/llm/layers/mlp/linear"):
        np.testing.assert_array_equal(flat[path], _read_with_tensorstore(fixture_params_dir, path.replace("/", ".")))


def test_restore_jax_array_and_str_path(fixture_params_dir):
    params = _model.restore_params(str(fixture_params_dir))  # default restore_type=jax.Array
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.Array) for x in leaves)
    np.testing.assert_array_equal(
        params["action_out_proj"]["bias"], _read_with_tensorstore(fixture_params_dir, "action_out_proj.bias")
    )


@pytest.mark.parametrize("restore_type", [np.ndarray, jax.Array])
def test_restore_dtype_casts_every_leaf(fixture_params_dir, restore_type):
    f32 = _flat(_model.restore_params(fixture_params_dir, restore_type=np.ndarray))
    bf16 = _flat(_model.restore_params(fixture_params_dir, restore_type=restore_type, dtype=jnp.bfloat16))
    assert bf16.keys() == f32.keys()
    for path, value in bf16.items():
        assert value.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(value), f32[path].astype(ml_dtypes.bfloat16))


def test_restore_nnx_style_strips_trailing_value(tmp_path):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(2, 4, 2, 2)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    table = rng.normal(size=(5, 4)).astype(np.float32)
    # nnx.State layout: every leaf path ends in "value", including SigLIP's module named `value`.
    nnx_tree = {
        "PaliGemma": {
            "img": {"MultiHeadDotProductAttention_0": {"value": {"kernel": {"value": kernel}}}},
            "llm": {"embedder": {"input_embedding": {"value": table}}},
        },
        "state_proj": {"bias": {"value": bias}},
    }
    path = _save(tmp_path / "params", {"params": nnx_tree})

    params = _model.restore_params(path, restore_type=np.ndarray)
    flat = _flat(params)
    assert sorted(flat) == [
        "PaliGemma/img/MultiHeadDotProductAttention_0/value/kernel",
        "PaliGemma/llm/embedder/input_embedding",
        "state_proj/bias",
    ]
    np.testing.assert_array_equal(flat["PaliGemma/img/MultiHeadDotProductAttention_0/value/kernel"], kernel)
    np.testing.assert_array_equal(flat["PaliGemma/llm/embedder/input_embedding"], table)
    np.testing.assert_array_equal(flat["state_proj/bias"], bias)


def test_restore_keeps_value_when_not_every_path_has_it(tmp_path):
    # Pure-dict tree where only some paths end in "value": nothing may be stripped.
    tree = {"attn": {"value": np.ones((2,), np.float32)}, "b": np.zeros((3,), np.float32)}
    path = _save(tmp_path / "params", {"params": tree})
    assert sorted(_flat(_model.restore_params(path, restore_type=np.ndarray))) == ["attn/value", "b"]


def test_restore_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint params directory not found: .*_METADATA.*/params"):
        _model.restore_params(tmp_path / "nope")


def test_restore_not_an_orbax_directory(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "assets").mkdir()
    with pytest.raises(ValueError, match=r"not an orbax checkpoint.*found: assets, params.*pass .*params"):
        _model.restore_params(tmp_path)


def test_restore_without_params_item(tmp_path):
    path = _save(tmp_path / "train_state", {"opt_state": {"mu": np.zeros((2,), np.float32)}})
    with pytest.raises(ValueError, match=r"no top-level 'params' item \(found \['opt_state'\]\)"):
        _model.restore_params(path)


def test_restore_rejects_remote_path():
    with pytest.raises(ValueError, match="maybe_download"):
        _model.restore_params("gs://openpi-assets/checkpoints/pi0_libero/params")


# ----------------------------------------------------------------------------------------------------------------
# check_params_match


def _tree():
    return {"a": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros((3,), np.float32)}, "b": np.zeros((4,))}


def test_check_params_match_ignores_dtype():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), _tree())
    _model.check_params_match(abstract, _tree())


def test_check_params_match_shape_mismatch():
    actual = _tree()
    actual["a"]["kernel"] = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"shape mismatch at a/kernel: the model expects \(2, 3\), got \(2, 5\)"):
        _model.check_params_match(_tree(), actual)


def test_check_params_match_missing_and_unexpected():
    actual = _tree()
    del actual["a"]["bias"]
    actual["c"] = {"w": np.zeros((1,)), "v": np.zeros((1,))}
    with pytest.raises(ValueError) as e:
        _model.check_params_match(_tree(), actual, what="checkpoint params")
    msg = str(e.value)
    assert msg.startswith("checkpoint params do not match")
    assert "1 missing (first: a/bias, expected shape (3,))" in msg
    assert "2 unexpected (first: c/v, shape (1,))" in msg
    assert "gemma_2b" in msg  # the config hint


def test_check_params_match_hints_at_unstripped_nnx_paths():
    actual = jax.tree.map(lambda x: {"value": x}, _tree())
    with pytest.raises(ValueError, match="restore_params"):
        _model.check_params_match(_tree(), actual)


# ----------------------------------------------------------------------------------------------------------------
# Observation


def _obs_dict(batch=(1,), hw=(224, 224)):
    image = np.full((*batch, *hw, 3), 51, np.uint8)
    return {
        "image": {k: image for k in _model.IMAGE_KEYS},
        "image_mask": {k: np.ones(batch, bool) for k in _model.IMAGE_KEYS},
        "state": np.zeros((*batch, 32), np.float32),
        "tokenized_prompt": np.zeros((*batch, 48), np.int32),
        "tokenized_prompt_mask": np.zeros((*batch, 48), bool),
    }


def test_constants():
    assert _model.IMAGE_KEYS == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert _model.IMAGE_RESOLUTION == (224, 224)


def test_from_dict_converts_uint8():
    data = _obs_dict()
    data["image"]["base_0_rgb"] = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    obs = _model.Observation.from_dict(data)
    base = obs.images["base_0_rgb"]
    assert base.dtype == np.float32
    np.testing.assert_allclose(base[0, 0, :, 0], [-1.0, 51 / 255 * 2 - 1, 1.0], atol=1e-7)  # 51 -> -0.6
    assert data["image"]["base_0_rgb"].dtype == np.uint8  # the input dict is left alone


def test_from_dict_matches_fixture_images(tiny_a_inputs):
    # The fixture's model images were made from the raw uint8 LIBERO images by the same x/255*2-1.
    data = {
        "image": {
            "base_0_rgb": tiny_a_inputs["raw_observation_image"],
            "left_wrist_0_rgb": tiny_a_inputs["raw_observation_wrist_image"],
        },
        "state": tiny_a_inputs["state"],
    }
    obs = _model.Observation.from_dict(data)
    for key in ("base_0_rgb", "left_wrist_0_rgb"):
        np.testing.assert_array_equal(obs.images[key], tiny_a_inputs[f"image_{key}"])


def test_from_dict_float_images_pass_through():
    data = _obs_dict()
    image = np.linspace(-1, 1, 224 * 224 * 3, dtype=np.float32).reshape(1, 224, 224, 3)
    data["image"]["base_0_rgb"] = image
    assert _model.Observation.from_dict(data).images["base_0_rgb"] is image


@pytest.mark.parametrize("drop", ["tokenized_prompt", "tokenized_prompt_mask"])
def test_from_dict_prompt_keys_together(drop):
    data = _obs_dict()
    del data[drop]
    with pytest.raises(ValueError, match="'tokenized_prompt' and 'tokenized_prompt_mask' must be given together"):
        _model.Observation.from_dict(data)


def test_from_dict_without_prompt_and_missing_keys():
    data = _obs_dict()
    del data["tokenized_prompt"], data["tokenized_prompt_mask"]
    obs = _model.Observation.from_dict(data)
    assert obs.tokenized_prompt is None and obs.tokenized_prompt_mask is None
    del data["state"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['state'\]"):
        _model.Observation.from_dict(data)


def test_observation_is_a_frozen_pytree():
    obs = _model.Observation.from_dict(_obs_dict())
    # 3 images + 3 masks + state + prompt + prompt mask; the None fields are empty subtrees.
    assert len(jax.tree.leaves(obs)) == 9
    doubled = jax.jit(lambda o: jax.tree.map(lambda x: x * 2, o))(obs)
    assert isinstance(doubled, _model.Observation)
    np.testing.assert_allclose(doubled.images["base_0_rgb"], 2 * obs.images["base_0_rgb"])
    with pytest.raises(AttributeError):
        obs.state = None  # frozen


def test_to_dict_round_trip():
    obs = _model.Observation.from_dict(_obs_dict())
    d = obs.to_dict()
    assert set(d) == {"image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask"}
    again = _model.Observation.from_dict(d)
    assert jax.tree.structure(again) == jax.tree.structure(obs)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(obs), strict=True):
        assert a is b


# ----------------------------------------------------------------------------------------------------------------
# preprocess_observation


def test_preprocess_fixture_inputs_pass_through(tiny_a_inputs):
    data = {
        "image": {k: tiny_a_inputs[f"image_{k}"] for k in _model.IMAGE_KEYS},
        "image_mask": {k: tiny_a_inputs[f"image_mask_{k}"] for k in _model.IMAGE_KEYS},
        "state": tiny_a_inputs["state"],
        "tokenized_prompt": tiny_a_inputs["tokenized_prompt"],
        "tokenized_prompt_mask": tiny_a_inputs["tokenized_prompt_mask"],
    }
    obs = _model.Observation.from_dict(data)
    out = _model.preprocess_observation(None, obs, train=False)
    for k in _model.IMAGE_KEYS:
        np.testing.assert_array_equal(out.images[k], tiny_a_inputs[f"image_{k}"])
        np.testing.assert_array_equal(out.image_masks[k], tiny_a_inputs[f"image_mask_{k}"])
    np.testing.assert_array_equal(out.tokenized_prompt, tiny_a_inputs["tokenized_prompt"])


def test_preprocess_defaults_masks_and_drops_extra_keys():
    data = _obs_dict(batch=(2,))
    data["image"]["extra_cam"] = data["image"]["base_0_rgb"]
    del data["image_mask"]["left_wrist_0_rgb"]
    out = jax.jit(lambda o: _model.preprocess_observation(None, o))(_model.Observation.from_dict(data))
    assert list(out.images) == list(_model.IMAGE_KEYS)
    assert list(out.image_masks) == list(_model.IMAGE_KEYS)
    assert out.image_masks["left_wrist_0_rgb"].dtype == jnp.bool_
    np.testing.assert_array_equal(out.image_masks["left_wrist_0_rgb"], [True, True])


def test_preprocess_resizes_with_pad():
    data = _obs_dict(hw=(100, 200))
    obs = _model.Observation.from_dict(data)
    out = _model.preprocess_observation(jax.random.key(0), obs)
    image = np.asarray(out.images["base_0_rgb"])
    assert image.shape == (1, 224, 224, 3)
    # 100x200 scaled by 224/200 is 112x224, centered: rows 56..167 hold the (constant) image, the rest is -1.
    np.testing.assert_array_equal(image[:, :56], -1.0)
    np.testing.assert_array_equal(image[:, 168:], -1.0)
    np.testing.assert_allclose(image[:, 56:168], 51 / 255 * 2 - 1, atol=1e-6)


def test_preprocess_missing_image_key():
    data = _obs_dict()
    del data["image"]["right_wrist_0_rgb"]
    with pytest.raises(ValueError, match=r"missing image\(s\) \['right_wrist_0_rgb'\]; it has \['base_0_rgb', 'left_"):
        _model.preprocess_observation(None, _model.Observation.from_dict(data))


def test_preprocess_train_is_refused():
    with pytest.raises(ValueError, match="augmentation is not implemented"):
        _model.preprocess_observation(jax.random.key(0), _model.Observation.from_dict(_obs_dict()), train=True)


# ----------------------------------------------------------------------------------------------------------------
# image_tools


def test_resize_with_pad_noop():
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    assert image_tools.resize_with_pad(images, 224, 224) is images
    x = jnp.zeros((2, 224, 224, 3))
    assert image_tools.resize_with_pad_jax(x, 224, 224) is x


def test_resize_with_pad_geometry_and_batch_dims():
    images = np.full((2, 3, 100, 200, 3), 7, np.uint8)
    out = image_tools.resize_with_pad(images, 224, 224)
    assert out.shape == (2, 3, 224, 224, 3) and out.dtype == np.uint8
    # Wide image: 224 wide, 112 high, 56 rows of zero padding above and below.
    np.testing.assert_array_equal(out[..., :56, :, :], 0)
    np.testing.assert_array_equal(out[..., 56:168, :, :], 7)
    np.testing.assert_array_equal(out[..., 168:, :, :], 0)
    # Tall image: 50x100 into 224x224 is 224 high, 112 wide, 56 columns of padding on each side.
    tall = image_tools.resize_with_pad(np.full((100, 50, 3), 9, np.uint8), 224, 224)
    np.testing.assert_array_equal(tall[:, :56], 0)
    np.testing.assert_array_equal(tall[:, 56:168], 9)
    np.testing.assert_array_equal(tall[:, 168:], 0)


def test_resize_with_pad_is_pil_bilinear():
    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(image).resize((224, 224), resample=Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(image_tools.resize_with_pad(image, 224, 224), want)


def test_resize_with_pad_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        image_tools.resize_with_pad(np.zeros((10, 10, 3), np.float32), 224, 224)


def test_resize_with_pad_jax_uint8_pads_with_zero():
    out = image_tools.resize_with_pad_jax(jnp.full((1, 50, 100, 3), 200, jnp.uint8), 224, 224)
    assert out.dtype == jnp.uint8 and out.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(out[:, :56], 0)
    np.testing.assert_array_equal(out[:, 56:168], 200)
