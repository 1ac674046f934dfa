"""SigLIP encoder against the upstream-produced golden fixture and the full-size param tree."""

import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi.models import model as _model
from openpi.models import siglip

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
ATOL = 1e-4


@pytest.fixture(scope="module")
def img_params(tiny_a_dir):
    params = _model.restore_params(tiny_a_dir / "checkpoint" / "params", restore_type=np.ndarray)
    return params["PaliGemma"]["img"]


@pytest.fixture(scope="module")
def tiny_module():
    # As in the fixture's config.json: mu/14, num_classes = VLM width 64, pool none, scan, float32.
    return siglip.Module(num_classes=64, variant="mu/14", pool_type="none", scan=True, dtype_mm="float32")


@pytest.mark.parametrize("cam_index", range(len(CAMERAS)))
def test_matches_fixture(cam_index, img_params, tiny_module, tiny_a_inputs, tiny_a_expected):
    cam = CAMERAS[cam_index]
    tokens, aux = jax.jit(tiny_module.apply)({"params": img_params}, tiny_a_inputs[f"image_{cam}"])

    exp = tiny_a_expected
    np.testing.assert_allclose(aux["stem"], exp[f"siglip_{cam}_stem"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(aux["with_posemb"], exp[f"siglip_{cam}_with_posemb"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(aux["block_out"], exp[f"siglip_{cam}_block_out"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(aux["encoded"], exp[f"siglip_{cam}_encoded"], atol=ATOL, rtol=0)
    # The image part of embed_prefix's output is exactly the SigLIP tokens (256 per camera, in IMAGE_KEYS order).
    expected_tokens = exp["prefix_tokens"][:, cam_index * 256 : (cam_index + 1) * 256]
    assert tokens.shape == expected_tokens.shape == (1, 256, 64)
    np.testing.assert_allclose(tokens, expected_tokens, atol=ATOL, rtol=0)


def test_unscanned_matches_scanned(img_params, tiny_module, tiny_a_inputs):
    # scan=False stores block i under encoderblock_{i}; unstacking the layer axis must give the same function.
    enc = dict(img_params["Transformer"])
    block = enc.pop("encoderblock")
    for i in range(jax.tree.leaves(block)[0].shape[0]):
        enc[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], block)
    params = {**img_params, "Transformer": enc}
    unscanned = siglip.Module(num_classes=64, variant="mu/14", scan=False)

    image = tiny_a_inputs["image_base_0_rgb"]
    want, _ = tiny_module.apply({"params": img_params}, image)
    got, _ = unscanned.apply({"params": params}, image)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # same math, different fusion: ~1e-6 apart


def test_so400m_param_tree_matches_upstream(tiny_a_dir):
    with open(tiny_a_dir.parent / "pi0_default_param_shapes.json") as f:
        upstream = json.load(f)["params"]
    prefix = "PaliGemma/img/"
    expected = {k[len(prefix) :]: tuple(v["shape"]) for k, v in upstream.items() if k.startswith(prefix)}

    module = siglip.Module(num_classes=2048, variant="So400m/14", pool_type="none", scan=True, dtype_mm="bfloat16")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    got = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}

    assert sorted(got) == sorted(expected)
    assert {k: v.shape for k, v in got.items()} == expected
    # Params are created in float32 whatever the compute dtype (spec section 1).
    assert {v.dtype for v in got.values()} == {jnp.dtype(jnp.float32)}


def test_dtypes_in_bfloat16_mode():
    module = siglip.Module(num_classes=64, variant="mu/14", dtype_mm="bfloat16")
    image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), image)
    tokens, aux = jax.eval_shape(module.apply, params, image)
    # The stem and position embedding are computed in f32; the residual stream and head run in dtype_mm.
    assert aux["stem"].dtype == aux["with_posemb"].dtype == jnp.float32
    assert aux["block_out"].dtype == tokens.dtype == jnp.bfloat16
    # LayerNorms have no dtype of their own (as upstream): with f32 params encoder_norm promotes to f32.
    assert aux["encoded"].dtype == jnp.float32
    assert tokens.shape == (2, 256, 64)
    assert aux["block_out"].shape == (1, 2, 256, 32)


def test_depth_override():
    module = siglip.Module(num_classes=8, variant="mu/14", depth=3)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32))
    p = shapes["params"]
    assert p["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (3, 32)
    assert p["pos_embedding"].shape == (1, 4, 32)  # a 28x28 image is a 2x2 grid of 14x14 patches


@pytest.mark.parametrize(
    ("variant", "want"),
    [
        ("mu/14", (32, 1, 128, 2, 16)),
        ("Ti/16", (192, 12, 768, 3, 64)),
        ("S/16", (384, 12, 1536, 6, 64)),
        ("B/16", (768, 12, 3072, 12, 64)),
        ("L/14", (1024, 24, 4096, 16, 64)),
        ("So400m/14", (1152, 27, 4304, 16, 72)),
    ],
)
def test_decode_variant(variant, want):
    v = siglip.decode_variant(variant)
    assert (v.width, v.depth, v.mlp_dim, v.num_heads, v.head_dim) == want
    patch = int(variant.split("/")[1])
    assert v.patch_size == (patch, patch)


@pytest.mark.parametrize("bad", ["So400m", "So400m/x", "Q/14"])
def test_decode_variant_errors(bad):
    with pytest.raises(ValueError, match="variant"):
        siglip.decode_variant(bad)


def test_rejects_unbatched_image():
    module = siglip.Module(num_classes=8, variant="mu/14")
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((224, 224, 3), jnp.float32))
