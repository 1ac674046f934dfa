"""Attention to language with known answers (issue 10, items 7 and 9): the key groups (text, text content without BOS
and the trailing token, BOS), the visible-key counts and the normalised mass, on the real tiny pi0 / pi0.5 and through
the store, the analysis and the report.

Known answers: with the action expert's query weights zeroed every expert-1 query attends uniformly to the keys it may
see, so the mass on a group is exactly its share of those keys (normalised mass 1), and the counts follow from the
masks; knocking out BOS (masked before the softmax) gives BOS mass exactly 0 and, where the inputs are unchanged, the
other masses divided by 1 − (BOS mass); pi0's state query is the same at every denoising step.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from model_inputs import fixture_observation, pi05_tiny_a_config, tiny_a_config
from test_analysis import build_store

from openpi.latents import analysis as A
from openpi.latents import report, schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.measures import attention as ATT
from openpi.latents.store import LatentStoreWriter
from openpi.latents.store.reader import open_store
from openpi.models import intervention as iv
from openpi.models import model as _model
from openpi.models import sampling
from openpi.models.capture import CaptureSpec

NUM_STEPS = 3
# Only the attention capture: the program differs from the plain one by the attention taps alone.
ATTENTION_ONLY = CaptureSpec(expert_0="off", expert_1="off", text=False, attention_to_text=True, trajectory=False)
KEYS = ("attention_to_text", "attention_to_text_content", "attention_to_bos")


def _uniform_expert1(params):
    """The params with the action expert's query projection zeroed: every expert-1 logit is 0, so its softmax is
    uniform over the keys the mask lets it see."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if "q_einsum_1" in jax.tree_util.keystr(path) else x, params
    )


def _latents(model, obs, noise, capture=ATTENTION_ONLY, intervention=None):
    out = model.infer_with_latents(
        jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise, capture=capture, intervention=intervention
    )
    return jax.tree.map(np.asarray, out)


def _plain(model, obs, noise):
    return np.asarray(model.sample_actions(jax.random.key(0), obs, num_steps=NUM_STEPS, noise=noise))


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def setup(request, tiny_a_dir, tiny_a_inputs, pi05_dir, pi05_inputs):
    """(config, params, observation, noise) of the pi0 or pi0.5 golden fixture (float32)."""
    if request.param == "pi0":
        config, root, inputs = tiny_a_config(), tiny_a_dir, tiny_a_inputs
    else:
        config, root, inputs = pi05_tiny_a_config(), pi05_dir, pi05_inputs
    params = _model.restore_params(root / "checkpoint" / "params", restore_type=np.ndarray)
    return config, params, fixture_observation(inputs), inputs["noise"]


# ---------------------------------------------------------------------------------------------------------------------
# The key groups


def test_text_key_groups_by_hand():
    cfg = tiny_a_config()
    ts, n = cfg.text_start, cfg.max_token_len
    lengths = (5, 2, 1, 0)  # a prompt, a blank prompt (BOS + "\n"), BOS alone, no text
    prefix = np.zeros((len(lengths), cfg.prefix_len), bool)
    prefix[:, : 2 * cfg.tokens_per_camera] = True  # two valid cameras: in no text group
    for b, k in enumerate(lengths):
        prefix[b, ts : ts + k] = True
    groups = np.asarray(sampling.text_key_groups(cfg, prefix))  # [B, 3, prefix + suffix]
    assert groups.shape == (4, 3, cfg.prefix_len + cfg.suffix_len)
    assert sampling.ATTENTION_KEY_GROUPS == ("text", "text_content", "bos")
    assert schema.ATTENTION_COUNT_GROUPS == ("visible", *sampling.ATTENTION_KEY_GROUPS)
    assert not groups[:, :, :ts].any() and not groups[:, :, cfg.prefix_len :].any()  # images and suffix: no group
    text, content, bos = (groups[:, g, ts : ts + n] for g in range(3))
    np.testing.assert_array_equal(text, prefix[:, ts:])
    expected_content = np.zeros((4, n), bool)
    expected_content[0, 1:4] = True  # positions 1..3 of 5: BOS (0) and the trailing token (4) left out
    np.testing.assert_array_equal(content, expected_content)
    np.testing.assert_array_equal(bos.sum(-1), [1, 1, 1, 0])
    assert bos[:3, 0].all()
    # The same rule as the analysis's informative_text_mask (one definition of "content" on both sides).
    rng = np.random.default_rng(0)
    masks = np.zeros((6, n), bool)
    for b in range(6):
        masks[b, : rng.integers(0, n + 1)] = True
    prefix = np.concatenate([np.ones((6, ts), bool), masks], axis=1)
    content = np.asarray(sampling.text_key_groups(cfg, prefix))[:, 1, ts : ts + n]
    np.testing.assert_array_equal(content, M.informative_text_mask(masks))


# ---------------------------------------------------------------------------------------------------------------------
# The capture on the real tiny models


def test_uniform_attention_gives_normalised_mass_one(setup):
    config, params, obs, noise = setup
    out = _latents(config.load(_uniform_expert1(params)), obs, noise)
    b = obs.state.shape[0]
    heads, L, H = config.action_expert_config.num_heads, config.depth, config.action_horizon
    ts = config.suffix_len
    for key in KEYS:
        assert out[key].shape == (NUM_STEPS, L, b, heads, ts) and out[key].dtype == np.float32
    counts = out["attention_key_counts"]
    assert counts.shape == (L, b, heads, ts, 4) and counts.dtype == np.float32
    # Counts from the masks alone: valid image tokens of each camera, valid text tokens, then the suffix keys each
    # query may see (pi0: the state token sees itself only, an action token the state and every action token;
    # pi0.5: every action token sees the H action tokens).
    cams = sum(np.asarray(obs.image_masks[k], np.int64) for k in _model.IMAGE_KEYS) * config.tokens_per_camera
    n_text = np.asarray(obs.tokenized_prompt_mask).sum(-1)
    suffix = np.full(ts, H) if config.pi05 else np.array([1] + [1 + H] * H)
    visible = (cams + n_text)[:, None] + suffix[None, :]  # [B, Ts]
    want = np.stack(
        [visible, np.broadcast_to(n_text[:, None], visible.shape), np.broadcast_to(n_text[:, None] - 2, visible.shape),
         np.ones_like(visible)], axis=-1,
    )  # fmt: skip
    np.testing.assert_array_equal(counts, np.broadcast_to(want[None, :, None], counts.shape))
    # Uniform attention: each group's mass is its share of the visible keys; BOS holds 1 / visible.
    share = {g: (want[..., i] / want[..., 0])[:, None] for i, g in enumerate(schema.ATTENTION_COUNT_GROUPS)}
    for key, group in zip(KEYS, ("text", "text_content", "bos")):
        np.testing.assert_allclose(out[key], np.broadcast_to(share[group], out[key].shape), rtol=1e-5, atol=0)
    norm = ATT.normalised_mass(out["attention_to_text_content"], counts, "text_content")
    np.testing.assert_allclose(norm, 1.0, rtol=1e-5)
    summary = ATT.attention_to_language(norm, state_query=not config.pi05)
    np.testing.assert_allclose(summary.per_head, 1.0, rtol=1e-5)
    assert summary.per_head.shape == (L, heads)


def test_attention_capture_never_changes_actions(setup):
    config, params, obs, noise = setup
    model = config.load(params)
    plain = _plain(model, obs, noise)
    for spec in (ATTENTION_ONLY, CaptureSpec(attention_to_text=False)):
        assert np.array_equal(_latents(model, obs, noise, spec)["actions"], plain), spec  # bit-identical


def test_state_query_is_the_same_at_every_denoising_step(setup):
    config, params, obs, noise = setup
    out = _latents(config.load(params), obs, noise)
    for key in KEYS:
        a = out[key]  # [S, L, B, heads, Ts]
        if not config.pi05:  # pi0: query 0 is the state token, which never sees the time or x_t
            assert np.array_equal(a[1:, ..., 0], np.broadcast_to(a[:1, ..., 0], a[1:, ..., 0].shape)), key
        assert np.abs(a[1:, ..., -1] - a[:1, ..., -1]).max() > 0, key  # an action query does change over steps
    s = ATT.attention_to_language(out["attention_to_text_content"], state_query=not config.pi05)
    assert (s.state_step_spread == 0.0) if not config.pi05 else np.isnan(s.state_step_spread)
    assert np.all(np.isnan(s.state)) == config.pi05


def test_knocking_out_bos_renormalises_the_rest(tiny_a_dir, tiny_a_inputs):
    config = tiny_a_config()
    params = _model.restore_params(tiny_a_dir / "checkpoint" / "params", restore_type=np.ndarray)
    model, obs, noise = config.load(params), fixture_observation(tiny_a_inputs), tiny_a_inputs["noise"]
    ts = config.text_start
    assert np.all(np.asarray(obs.tokenized_prompt)[:, 0] == 2) and np.asarray(obs.tokenized_prompt_mask)[:, 0].all()
    base = _latents(model, obs, noise)
    knock = iv.knockout_attention("suffix", (ts, ts + 1), layers=(1,))  # the action expert's queries -> BOS, layer 1
    out = _latents(model, obs, noise, intervention=knock)
    assert np.all(out["attention_to_bos"][:, 1] == 0.0) and np.all(base["attention_to_bos"][:, 1] > 0.0)
    # Counts: layer 1 sees one key fewer (BOS); the other layers see what they saw.
    c, c0 = out["attention_key_counts"], base["attention_key_counts"]
    np.testing.assert_array_equal(np.delete(c, 1, axis=0), np.delete(c0, 1, axis=0))
    np.testing.assert_array_equal(c[1], c0[1] - np.array([1, 1, 0, 1], np.float32))
    # Step 0, layer 0 is before the knockout: bit-identical.
    for key in KEYS:
        np.testing.assert_array_equal(out[key][0, 0], base[key][0, 0])
    # At layer 1 the logits are unchanged (step 0; the state query at every step), so the softmax renormalises over
    # the remaining keys: content' = content / (1 − bos), text' = (text − bos) / (1 − bos).
    bos = base["attention_to_bos"][:, 1].astype(np.float64)
    for sel in [(0, Ellipsis), (slice(None), Ellipsis, 0)]:
        keep = 1.0 - bos[sel]
        content = base["attention_to_text_content"][:, 1][sel] / keep
        text = (base["attention_to_text"][:, 1][sel] - bos[sel]) / keep
        np.testing.assert_allclose(out["attention_to_text_content"][:, 1][sel], content, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["attention_to_text"][:, 1][sel], text, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Store, analysis and report

S, L, HEADS, TS = 3, 2, 2, 3  # pi0 layout: query 0 the state token, queries 1-2 action tokens
VISIBLE = np.array([10.0, 12.0, 12.0])  # the state query sees fewer keys (no action token)
N_TEXT, N_CONTENT = 6.0, 4.0


def _record(t: int, k: int, i: int, *, old: bool = False) -> dict:
    """One rollout step with planted attention: head 0 attends to the content as uniform attention would (normalised
    1), head 1 twice that (2); BOS takes 0.5 (head 0) and 0.1 (head 1); the state query is the same every step."""
    share = N_CONTENT / VISIBLE  # [Ts]
    content = np.empty((S, L, 1, HEADS, TS), np.float32)
    content[..., 0, :] = share
    content[..., 1, :] = 2 * share
    # action queries vary over denoising steps (factors 0.99, 1, 1.01: their mean over steps is unchanged)
    content[..., 1:] *= np.array([0.99, 1.0, 1.01], np.float32)[:, None, None, None, None]
    bos = np.empty_like(content)
    bos[..., 0, :], bos[..., 1, :] = 0.5, 0.1
    counts = np.stack([VISIBLE, np.full(TS, N_TEXT), np.full(TS, N_CONTENT), np.ones(TS)], -1).astype(np.float32)
    rec = {
        "t": 5 * i,
        "prompt": f"do task {t}",
        "actions": np.zeros((4, 7), np.float32),
        "text_mask": np.ones((1, 6), bool),
        "tokenized_prompt": np.arange(1, 7, dtype=np.int32)[None],
        "attention_to_text": content + bos + 0.01,
        "denoise_times": np.array([1.0, 2 / 3, 1 / 3], np.float32),
    }
    if not old:
        rec["attention_to_text_content"] = content
        rec["attention_to_bos"] = bos
        rec["attention_key_counts"] = np.broadcast_to(counts, (L, 1, HEADS, TS, 4)).copy()
    return rec


def test_store_round_trip_of_the_attention_keys(tmp_path):
    rec = _record(0, 0, 0)
    with LatentStoreWriter.create_or_open(tmp_path / "s", {"kind": "test"}, resume=False) as writer:
        ep = writer.begin_episode({"task_id": 0, "task_name": "t", "suite": "s", "language": "l"}, 0, {})
        ep.append_step(rec)
        ep.finish({"success": True, "total_steps": 1})
    store = open_store(tmp_path / "s")
    fields = store.episode(0, 0).fields
    for key in (*KEYS[1:], "attention_key_counts"):
        assert fields[key].dims == schema.RECORD_KEYS[key].dims and fields[key].dtype == "float32", key
        np.testing.assert_array_equal(store.read_array(0, 0, key)[0], rec[key])
    assert schema.RECORD_KEYS["attention_key_counts"].dims[0] == "layer"  # read one layer at a time
    np.testing.assert_array_equal(
        store.read_array(0, 0, "attention_key_counts", layer=1)[0], rec["attention_key_counts"][1]
    )


def test_analysis_normalises_per_head_and_reports_the_state_query_once(tmp_path):
    root = build_store(tmp_path / "s", _record, tasks=(0, 1), episodes=1, steps=2)
    res = A.analyze_collection(root, embedding=None, probe=False, pooled=False, n_boot=50)
    # Per layer: the mean over heads of 1 and 2 (both constant over queries and steps); BOS: mean of 0.5 and 0.1.
    for metric, want in (("attention_to_text_normalised", 1.5), ("attention_to_bos", 0.3)):
        np.testing.assert_allclose([c.estimate for c in res.per_layer("expert_1", metric)], want, rtol=1e-6)
    means = A.attention_means(res)
    np.testing.assert_allclose(means["heads:normalised"], [[1.0, 2.0]] * L, rtol=1e-6)
    np.testing.assert_allclose(means["state:normalised"], [1.5] * L, rtol=1e-6)
    np.testing.assert_allclose(means["state:text"], [1.5 * N_CONTENT / VISIBLE[0]] * L, rtol=1e-6)
    assert means["actions:text"].shape == (S, L) and means["state:text"].shape == (L,)  # the state query: once
    assert res.attention["state_step_spread:text"] == 0.0
    data = report.write_report(res, tmp_path / "rep")
    att = data["metrics"]["attention_by_denoise_step"]
    assert "BOS and the last valid text key" in att["excluded_keys"] and "state token" in att["query_roles"]
    assert att["normalised"]["state_query_max_deviation_across_steps"] == 0.0
    np.testing.assert_allclose(att["normalised"]["per_head_mean"], [1.5] * L, rtol=1e-6)
    assert "= 1" in data["statistics"]["attention_to_text"]["control"]
    assert data["figures"]["attention_to_text"]["panels"][2].startswith("text mass / text share")
    rows = (tmp_path / "rep" / "attention_heads.csv").read_text().splitlines()
    assert (
        rows[0] == "layer,head,all_queries_text,all_queries_normalised,all_queries_bos" and len(rows) == 1 + L * HEADS
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "the text's share of the keys" in md and "BOS alone takes 0.300" in md


def test_pi05_layout_has_no_state_query(tmp_path):
    manifest = {"suffix_segment_names": ["action_0", "actions_1:"]}
    root = build_store(tmp_path / "s", _record, tasks=(0,), episodes=1, steps=2, manifest=manifest)
    res = A.analyze_collection(root, embedding=None, probe=False, pooled=False, n_boot=50)
    means = A.attention_means(res)
    assert not res.streams["expert_1"].state_query and np.all(np.isnan(means["state:text"]))
    # Every query is an action query: averaged over steps, the grid is the mean over all three queries and heads.
    hand = np.mean([N_CONTENT / VISIBLE * h for h in (1, 2)])
    np.testing.assert_allclose(means["actions:text"].mean(0), hand, rtol=1e-6)
    data = report.write_report(res, tmp_path / "rep")
    att = json.loads((tmp_path / "rep" / "metrics.json").read_text())["metrics"]["attention_by_denoise_step"]
    assert att["text"]["state_query"] is None and "no state token" in att["query_roles"]
    assert data["streams"]["expert_1"]["state_query"]["present"] is False


def test_store_without_the_new_keys_gives_nan_with_a_reason(tmp_path):
    root = build_store(tmp_path / "s", lambda t, k, i: _record(t, k, i, old=True), tasks=(0,), episodes=1, steps=2)
    res = A.analyze_collection(root, embedding=None, probe=False, pooled=False, n_boot=50)
    for metric in ("attention_to_text", "attention_to_text_normalised", "attention_to_bos"):
        assert not res.has("expert_1", metric)
        assert "written before the capture separated BOS" in res.reason("expert_1", metric), metric
    data = report.write_report(res, tmp_path / "rep")
    assert data["metrics"]["attention_to_text"]["expert_1"]["per_layer"] is None
    assert "attention_to_text_content" in data["metrics"]["attention_by_denoise_step"]["reason"]
    # include_constant_tokens reads the mass on every valid text key, which old stores hold.
    res = A.analyze_collection(root, embedding=None, probe=False, pooled=False, include_constant_tokens=True)
    assert res.has("expert_1", "attention_to_text") and not res.has("expert_1", "attention_to_text_normalised")
    want = np.mean(_record(0, 0, 0)["attention_to_text"], axis=(0, 2, 3, 4))
    np.testing.assert_allclose([c.estimate for c in res.per_layer("expert_1", "attention_to_text")], want, rtol=1e-6)
