"""The model-family seam: the token layout every package reads, the protocols, the shared stream-point vocabulary."""

from __future__ import annotations

import jax

from openpi.models import family, intervention, stream_points, taps
from openpi.models.pi0 import Pi0, Pi0Config


def test_pi0_layout_by_arithmetic():
    """pi0 (So400m/14 at 224x224: (224/14)^2 = 256 tokens per camera, 3 cameras, 48 text tokens; suffix = state + 50
    actions) and pi0.5 (200 text tokens; no state token)."""
    layout = Pi0Config().layout
    assert layout.cameras == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert (layout.tokens_per_camera, layout.text_start, layout.prefix_len, layout.suffix_len) == (256, 768, 816, 51)
    assert layout.segments() == {
        "base_0_rgb": (0, 0, 256),
        "left_wrist_0_rgb": (0, 256, 512),
        "right_wrist_0_rgb": (0, 512, 768),
        "text": (0, 768, 816),
        "state": (1, 0, 1),
        "actions": (1, 1, 51),
    }
    assert layout.joint_span("actions") == (817, 867) and layout.joint_span("suffix") == (816, 867)
    assert [(a.name, a.experts, a.steps) for a in layout.step_axes] == [
        ("prefix", (0,), "once"),
        ("denoise", (1,), "num_steps"),
    ]
    assert layout.runs_once(0) and not layout.runs_once(1)
    assert [e.width for e in layout.experts] == [2048, 1024] and layout.depth == 18
    assert layout.manifest_fields() == {
        "text_start": 768,
        "segment_names": ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb", "text"],
        "suffix_segment_names": ["state", "actions"],
    }
    pi05 = Pi0Config(pi05=True, action_horizon=10).layout
    assert pi05.prefix_len == 768 + 200 and pi05.suffix_len == 10
    assert pi05.segments()["actions"] == (1, 0, 10) and "state" not in pi05.segments()
    assert pi05.suffix_segment_names == ("action_0", "actions_1:")


def test_config_delegates_to_its_layout():
    config = Pi0Config(pi05=True)
    for name in ("text_start", "prefix_len", "suffix_len", "segment_names", "suffix_segment_names", "num_cameras"):
        assert getattr(config, name) == getattr(config.layout, name), name
    assert intervention.expert_segments(config) == config.layout.segments()


def test_pi0_is_a_family_model():
    model = jax.eval_shape(lambda: Pi0Config(paligemma_variant="dummy", action_expert_variant="dummy").create(
        jax.random.key(0)
    ))  # fmt: skip
    assert isinstance(model, Pi0) and isinstance(model, family.Model)
    assert model.layout is model.config.layout


def test_one_stream_point_vocabulary():
    assert intervention.STREAM_POINTS == stream_points.EDIT_POINTS
    assert set(stream_points.EDIT_POINTS) < set(stream_points.TAP_POINTS)
    assert taps.Stream is stream_points.StreamPoint
    # the four of the seam, then the FFN points of the causal maps (MLP output, FFN hidden activations)
    assert stream_points.EDIT_POINTS[:4] == ("residual", "head_out", "attn_out", "post_attn_residual")
    assert set(stream_points.EDIT_POINTS[4:]) == {"mlp_out", "ffn_hidden"}
