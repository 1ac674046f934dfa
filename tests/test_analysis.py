"""Known-answer tests of the language-loss analysis (openpi.latents.analysis, openpi.latents.report, checkpoint
leaves), on synthetic stores with planted answers, on the real tiny pi0, and end to end on LIBERO."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
import tyro

from openpi.latents import analysis as A
from openpi.latents import report, schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data import embedding as CL
from openpi.latents.analysis.data.labels import resolve_denoise_steps
from openpi.latents.analysis.data.source import make_source
from openpi.latents.analysis.run.language_loss import analyze_rollout_step
from openpi.latents.report import plots as P
from openpi.latents.store import LatentStoreWriter, export_pickle

REPO = pathlib.Path(__file__).resolve().parents[1]
BF16 = ml_dtypes.bfloat16
SEGMENTS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb", "text"]
STREAMS = ("text_only", "expert_0", "expert_1")


# --------------------------------------------------------------------------------------------------------------------
# Synthetic stores


class Synth:
    """Sizes and a random record of a small synthetic capture with every key the analysis reads."""

    def __init__(self, L=3, W=16, T=8, n_valid=5, S=2, Ts=3, heads=2, V=64, seed=0):
        self.L, self.W, self.T, self.n_valid, self.S, self.Ts, self.heads, self.V = L, W, T, n_valid, S, Ts, heads, V
        rng = np.random.default_rng(seed)
        self.embedding = rng.standard_normal((V, W)).astype(np.float32)
        self.scale = np.zeros(W, np.float32)

    def ids(self, task_id: int) -> np.ndarray:
        ids = np.zeros((1, self.T), np.int32)
        ids[0, : self.n_valid] = (np.arange(self.n_valid) * 7 + 3 * task_id + 1) % self.V
        return ids

    def record(self, t: int, k: int, i: int, *, rng=None) -> dict:
        rng = rng or np.random.default_rng([t, k, i])
        L, W, S = self.L, self.W, self.S
        ids = self.ids(t)
        mask = np.zeros((1, self.T), bool)
        mask[0, : self.n_valid] = True
        text = rng.standard_normal((L, 1, self.T, W)).astype(np.float32)
        text[0] = self.embedding[ids] * np.sqrt(W)  # layer 0 = the embedding (what pi0 feeds in)
        return {
            "t": 5 * i,
            "prompt": f"do task {t}",
            "actions": rng.standard_normal((4, 7)).astype(np.float32),
            "text_only_hidden_states": text.astype(BF16),
            "text_mask": mask,
            "tokenized_prompt": ids,
            "expert_0_segment_means": rng.standard_normal((L, 1, 4, W)).astype(BF16),
            "expert_1_segment_means": rng.standard_normal((S, L, 1, 2, W)).astype(BF16),
            **self.attention(rng),
            "denoise_times": np.linspace(1.0, 1.0 / S, S).astype(np.float32),
        }

    def attention(self, rng) -> dict:
        """The attention captures: masses on the text content keys and BOS (and every valid text key), and the
        visible-key counts (query 0 sees 10 keys, the others 12; 5 text keys, 3 of them content, and BOS)."""
        shape = (self.S, self.L, 1, self.heads, self.Ts)
        content = rng.uniform(0, 0.4, shape).astype(np.float32)
        bos = rng.uniform(0, 0.4, shape).astype(np.float32)
        counts = np.array([[10, 5, 3, 1]] + [[12, 5, 3, 1]] * (self.Ts - 1), np.float32)
        return {
            "attention_to_text": content + bos + 0.1,
            "attention_to_text_content": content,
            "attention_to_bos": bos,
            "attention_key_counts": np.broadcast_to(counts, (self.L, 1, self.heads, self.Ts, 4)).copy(),
        }

    def token_embedding(self) -> CL.TokenEmbedding:
        return CL.TokenEmbedding(self.embedding, self.scale, "synthetic")


def build_store(
    root,
    record_fn,
    *,
    tasks=(0, 1),
    episodes=2,
    steps=4,
    success=lambda t, k: k == 0,
    error=lambda t, k: None,
    manifest=None,
):
    """A synthetic store; ``steps`` is an int or ``steps(t, k)`` (0: the episode has no rollout step)."""
    man = {
        "kind": "synthetic",
        "segment_names": SEGMENTS,
        "preset": "synthetic",
        "checkpoint": None,
        **(manifest or {}),
    }
    with LatentStoreWriter.create_or_open(root, man, resume=False) as writer:
        for t in tasks:
            task = {"task_id": t, "task_name": f"task{t}", "suite": "synthetic", "language": f"do task {t}"}
            for k in range(episodes):
                n = steps(t, k) if callable(steps) else steps
                ep = writer.begin_episode(task, k, {"prompt": f"do task {t}"})
                for i in range(n):
                    ep.append_step(record_fn(t, k, i))
                ep.finish({"success": bool(success(t, k)), "total_steps": 5 * n, "error": error(t, k)})
    return pathlib.Path(root)


def with_cf(
    rec: dict,
    cf: dict,
    keys=(
        "text_only_hidden_states",
        "text_mask",
        "tokenized_prompt",
        "expert_0_segment_means",
        "expert_1_segment_means",
        "actions",
    ),
) -> dict:
    out = dict(rec)
    out["cf_prompt"] = cf["prompt"]
    out.update({f"cf_{k}": cf[k] for k in keys})
    return out


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint leaves


def test_checkpoint_leaves_equal_restore_params(tiny_a_dir):
    from openpi.models import model as _model

    leaves = CL.read_checkpoint_leaves(str(tiny_a_dir / "checkpoint"))
    params = _model.restore_params(tiny_a_dir / "checkpoint" / "params", restore_type=np.ndarray)
    llm = params["PaliGemma"]["llm"]
    np.testing.assert_array_equal(leaves.embedding, llm["embedder"]["input_embedding"])
    np.testing.assert_array_equal(leaves.final_norm_scale, llm["final_norm"]["scale"])
    assert leaves.embedding.dtype == np.float32 and leaves.vocab_size == 1024 and leaves.width == 64
    # The manifest route reads the same leaves from a checkpoint path.
    assert CL.token_embedding_for_manifest({"checkpoint": str(tiny_a_dir / "checkpoint")}) is leaves


def test_checkpoint_leaves_nnx_value_suffix_and_errors(tmp_path):
    import orbax.checkpoint as ocp

    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    scale = np.array([0.5, -1.0, 2.0], np.float32)
    tree = {
        "params": {
            "PaliGemma": {
                "llm": {
                    "embedder": {"input_embedding": {"value": emb}},
                    "final_norm": {"scale": {"value": scale}},
                    "layers": {"big": {"value": np.ones((64, 64), np.float32)}},
                }
            }
        }
    }
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt" / "params", tree)
    leaves = CL.read_checkpoint_leaves(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(leaves.embedding, emb)
    np.testing.assert_array_equal(leaves.final_norm_scale, scale)
    with pytest.raises(FileNotFoundError, match="_METADATA"):
        CL.read_checkpoint_leaves(str(tmp_path))
    with pytest.raises(ValueError, match="no checkpoint"):
        CL.token_embedding_for_manifest({"checkpoint": None})


# --------------------------------------------------------------------------------------------------------------------
# The real tiny pi0: layer-0 text reconstruction, identical-prompt sensitivity


@pytest.fixture(scope="module")
def tiny_run(tiny_a_inputs):
    """One LIBERO-style observation through the tiny preset (random params from its seed), with reruns."""
    from openpi.models.capture import CaptureSpec
    from openpi.policies import policy_config

    policy = policy_config.create_trained_policy("pi0_libero_tiny", sample_kwargs={"num_steps": 3})
    obs = {
        "observation/image": tiny_a_inputs["raw_observation_image"][0],
        "observation/wrist_image": tiny_a_inputs["raw_observation_wrist_image"][0],
        "observation/state": tiny_a_inputs["raw_observation_state"][0],
        "prompt": "put the bowl on the stove",
    }
    spec = CaptureSpec(expert_0="full", expert_1="pooled")
    a = policy.infer_with_latents(obs, capture=spec)
    same = policy.infer_with_latents(obs, noise=a["noise"], capture=spec)
    blank = policy.infer_with_latents({**obs, "prompt": ""}, noise=a["noise"], capture=spec)
    return policy, a, same, blank


def _step(run) -> dict:
    return {
        "t": 0,
        "prompt": "put the bowl on the stove",
        "actions": np.asarray(run["actions"], np.float32),
        **run["latents"],
    }


# What a collection with the tiny preset records in its manifest (model_config = Pi0Config.describe()).
TINY_MODEL_CONFIG = "Pi0Config(paligemma=dummy, action_expert=dummy, siglip=mu/14, vocab=1024, horizon=50)"
TINY_MANIFEST = {"checkpoint": "random(seed=0)", "preset": "pi0_libero_tiny", "model_config": TINY_MODEL_CONFIG}


def test_tiny_model_embedding_from_seed_equals_policy(tiny_run):
    policy = tiny_run[0]
    assert policy.model.config.describe() == TINY_MODEL_CONFIG
    emb = CL.token_embedding_for_manifest(TINY_MANIFEST)
    llm = policy.model.params["PaliGemma"]["llm"]
    np.testing.assert_array_equal(emb.embedding, np.asarray(llm["embedder"]["input_embedding"]))
    np.testing.assert_array_equal(emb.final_norm_scale, np.asarray(llm["final_norm"]["scale"]))


def test_layer0_text_reconstruction_real_tiny_model_is_exact_and_random_is_chance(tiny_run):
    _, run, _, _ = tiny_run
    lat = run["latents"]
    emb = CL.token_embedding_from_model_config(TINY_MODEL_CONFIG, 0)
    mask, ids = lat["text_mask"], lat["tokenized_prompt"]
    n_valid = int(mask.sum())
    assert n_valid >= 7  # BOS + "put the bowl on the stove" + "\n"
    tr = M.text_reconstruction(lat["text_only_hidden_states"][0], ids, mask, emb.embedding)
    assert tr.accuracy == 1.0 and tr.n_valid == n_valid  # every valid prompt token recovered
    np.testing.assert_array_equal(tr.predicted_ids[mask], ids[mask])
    # The same positions read from the full expert-0 capture (text at text_start) decode identically.
    start = 768 if lat["expert_0_hidden_states"].shape[2] > 768 else lat["expert_0_hidden_states"].shape[2] - 48
    full_text = lat["expert_0_hidden_states"][0][:, start:, :]
    assert M.text_reconstruction(full_text, ids, mask, emb.embedding).accuracy == 1.0
    # The seed view of this step: text_only language loss 0 at layer 0 (the embedding comes from the manifest).
    seed = analyze_rollout_step(_step(run), manifest=TINY_MANIFEST)
    assert seed["text_only_language_loss"][0] == 0.0 and seed["measures"]["text_only"]["measure"] == "language_loss"
    # Random vectors of the same width: chance is 1/1024; 4000 positions give ~4 hits (P(>=40) < 1e-20).
    rand = np.random.default_rng(0).standard_normal((4000, emb.width)).astype(np.float32)
    rand_ids = np.random.default_rng(1).integers(0, emb.vocab_size, 4000)
    acc = M.text_reconstruction(rand, rand_ids, None, emb.embedding).accuracy
    assert acc < 0.01


def test_prompt_sensitivity_zero_for_identical_prompt_real_model(tiny_run, tmp_path):
    _, run, same, blank = tiny_run
    step = _step(run)
    cf_same = with_cf(
        step,
        {**_step(same)},
        keys=(
            "text_only_hidden_states",
            "text_mask",
            "tokenized_prompt",
            "expert_0_hidden_states",
            "expert_1_segment_means",
            "actions",
        ),
    )
    out = analyze_rollout_step(cf_same, embedding=None)
    assert out["expert_0_language_loss"] == [0.0] * len(out["expert_0_language_loss"])
    assert out["expert_1_language_loss"] == [0.0] * len(out["expert_1_language_loss"])
    assert out["measures"]["expert_1"]["measure"] == "prompt_sensitivity"
    assert out["text_only_language_loss"] is None and "embedding" in out["measures"]["text_only"]["reason"]
    # A blank prompt does change expert 0 (after layer 0, whose image tokens cannot see the text yet) and expert 1.
    cf_blank = with_cf(
        step,
        _step(blank),
        keys=(
            "text_only_hidden_states",
            "text_mask",
            "tokenized_prompt",
            "expert_0_hidden_states",
            "expert_1_segment_means",
            "actions",
        ),
    )
    out = analyze_rollout_step(cf_blank, embedding=None)
    assert out["expert_0_language_loss"][0] == 0.0 and max(out["expert_0_language_loss"][1:]) > 0
    assert max(out["expert_1_language_loss"]) > 0
    # Through a store and the full analysis: every stream and layer 0, and the action chunks identical.
    root = build_store(
        tmp_path / "s",
        lambda t, k, i: {**cf_same, "t": 5 * i},
        tasks=(0,),
        episodes=1,
        steps=2,
        manifest={"text_start": 768},
    )
    res = A.analyze_collection(root, embedding=None, probe=False)
    for s in STREAMS:
        vals = np.concatenate(res.step_values[(s, "prompt_sensitivity")])
        assert np.all(vals == 0.0), s
    assert np.all(res.action_divergence_per_episode() == 0.0)
    assert res.streams["text_only"].mode == "text"


# --------------------------------------------------------------------------------------------------------------------
# Synthetic known answers


def test_probe_finds_planted_task_signal_and_shuffled_control_is_chance(tmp_path):
    syn = Synth(L=2, W=8)
    signal = np.random.default_rng(5).standard_normal((3, 2, 8)) * 3

    def rec(t, k, i):
        r = syn.record(t, k, i)
        e1 = r["expert_1_segment_means"].astype(np.float32)
        e1[:, 1, 0] += signal[t]  # layer 1 carries the task; layer 0 is noise
        r["expert_1_segment_means"] = e1.astype(BF16)
        return r

    root = build_store(tmp_path / "s", rec, tasks=(0, 1, 2), episodes=4, steps=5)
    res = A.analyze_collection(root, embedding=None, probe_shuffles=20)
    noise, planted = res.probes["expert_1"]
    assert planted.accuracy >= 0.95 and planted.p_value <= 0.05
    assert planted.n_groups == 12 and planted.chance_majority == pytest.approx(1 / 3)
    assert planted.shuffled_ci[0] <= planted.chance_majority <= planted.shuffled_ci[1]
    assert abs(planted.shuffled_mean - 1 / 3) < 0.15
    assert noise.accuracy < 0.75  # pure noise: no planted signal to find


def test_drift_identical_steps_is_zero_and_known_angles(tmp_path):
    syn = Synth()
    a = np.zeros((syn.W,), np.float32)
    b = np.zeros((syn.W,), np.float32)
    a[:4], b[4:8] = 1.0, 1.0  # orthogonal, exact in bf16
    patterns = [a, a + b, b, -a]  # cosines to step 0: 1, 1/sqrt(2), 0, -1

    def rec(t, k, i):
        r = syn.record(t, k, 0)  # every step identical ...
        r["t"] = 5 * i
        if k == 1:  # ... except expert 1 of episode 1, which turns by known angles
            r["expert_1_segment_means"] = np.broadcast_to(patterns[i], r["expert_1_segment_means"].shape).astype(BF16)
        return r

    root = build_store(tmp_path / "s", rec, tasks=(0,), episodes=2, steps=4)
    res = A.analyze_collection(root, embedding=None, probe=False)
    for s in STREAMS:
        assert np.all(res.step_values[(s, "drift")][0] == 0.0), s
    np.testing.assert_allclose(
        res.step_values[("expert_1", "drift")][1][:, 0], [0, 1 - 1 / np.sqrt(2), 1, 2], atol=1e-6
    )
    assert np.all(res.step_values[("text_only", "drift")][1] == 0.0)


def test_attention_to_text_equals_hand_computation(tmp_path):
    syn = Synth(L=2, S=2, heads=1, Ts=2)
    # probs [S, L, B, heads, Ts queries, 5 keys]; key 0 is BOS, keys 1-2 the text content, key 3 the trailing "\n".
    probs = np.array(
        [
            [[0.2, 0.5, 0.25, 0.05, 0.0], [0.1, 0.1, 0.1, 0.3, 0.4]],  # content 0.75, 0.2
            [[0.2, 0.5, 0.25, 0.05, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5]],  # the state query (0) the same at every step
        ]
    )  # content 0.75, 0.0
    probs = np.broadcast_to(probs[:, None, None, None], (2, 2, 1, 1, 2, 5))
    content = M.attention_mass_onto_keys(probs, np.array([False, True, True, False, False]))
    bos = M.attention_mass_onto_keys(probs, np.array([True, False, False, False, False]))
    hand = np.array([[0.75, 0.2], [0.75, 0.0]])  # [S, query]
    np.testing.assert_allclose(content[:, 0, 0, 0], hand)
    counts = np.array([[5, 4, 2, 1], [5, 4, 2, 1]], np.float32)  # every key visible: content share 2/5

    def rec(t, k, i):
        r = syn.record(t, k, i)
        r["attention_to_text_content"] = content.astype(np.float32)
        r["attention_to_bos"] = bos.astype(np.float32)
        r["attention_key_counts"] = np.broadcast_to(counts, (2, 1, 1, 2, 4)).copy()
        return r

    res = A.analyze_collection(
        build_store(tmp_path / "s", rec, tasks=(0,), episodes=1, steps=3), embedding=None, probe=False
    )
    # Per layer: mean over S, heads and queries = (0.75 + 0.2 + 0.75 + 0.0) / 4; normalised: / (2/5); BOS 0.2, 0.1.
    np.testing.assert_allclose(res.step_values[("expert_1", "attention_to_text")][0], 0.425, atol=1e-7)
    np.testing.assert_allclose(res.step_values[("expert_1", "attention_to_text_normalised")][0], 1.0625, rtol=1e-6)
    np.testing.assert_allclose(res.step_values[("expert_1", "attention_to_bos")][0], 0.125, atol=1e-7)
    means = A.attention_means(res)
    np.testing.assert_allclose(means["state:text"], [0.75] * 2, atol=1e-7)  # once, not per denoising step
    np.testing.assert_allclose(means["actions:text"], [[0.2] * 2, [0.0] * 2], atol=1e-7)
    np.testing.assert_allclose(means["heads:bos"], [[0.125]] * 2, atol=1e-7)
    assert res.attention["state_step_spread:text"] == 0.0


def test_text_reconstruction_through_store_manifest_checkpoint_and_full_capture(tmp_path, tiny_a_dir):
    """Layer 0 holds E[id]·sqrt(W): accuracy 1 there, via the manifest's checkpoint; the text window may come from a
    full expert-0 capture; deeper (random) layers sit near chance."""
    leaves = CL.read_checkpoint_leaves(str(tiny_a_dir / "checkpoint"))
    syn = Synth(W=64, T=8, V=1024)
    syn.embedding = leaves.embedding
    cams, per_cam = 3, 4

    def rec(t, k, i):
        r = syn.record(t, k, i)
        text = r.pop("text_only_hidden_states")
        rng = np.random.default_rng([t, k, i, 9])
        img = rng.standard_normal((syn.L, 1, cams * per_cam, syn.W)).astype(BF16)
        r["expert_0_hidden_states"] = np.concatenate([img, text], axis=2)
        r.pop("expert_0_segment_means")
        r["expert_1_hidden_states"] = rng.standard_normal((syn.S, syn.L, 1, syn.Ts, syn.W)).astype(BF16)
        r.pop("expert_1_segment_means")
        return r

    root = build_store(
        tmp_path / "s",
        rec,
        steps=3,
        manifest={"checkpoint": str(tiny_a_dir / "checkpoint"), "text_start": cams * per_cam},
    )
    res = A.analyze_collection(root, probe_shuffles=2)
    assert res.streams["text_only"].mode == "text_from_full" and res.streams["expert_0"].mode == "full"
    acc = res.per_episode("text_only", "text_accuracy")
    assert np.all(acc[:, 0] == 1.0) and np.all(acc[:, 1:] < 0.5)
    assert np.all(res.per_episode("text_only", "language_loss")[:, 0] == 0.0)
    nll = res.per_episode("text_only", "logit_nll")
    assert np.all(nll >= 0) and np.all(np.isfinite(nll))
    assert res.probes["expert_0"][0].n_samples == 12 and res.probes["expert_1"][0].n_samples == 12


def test_missing_streams_and_counterfactuals_are_reported(tmp_path):
    syn = Synth()

    def rec(t, k, i):
        r = syn.record(t, k, i)
        for key in ("expert_1_segment_means", "text_only_hidden_states", *schema.ATTENTION_KEYS):
            r.pop(key)
        return r

    res = A.analyze_collection(build_store(tmp_path / "s", rec, tasks=(0,), episodes=2, steps=2), embedding=None)
    assert set(res.streams) == {"expert_0"}
    assert "text window not captured" in res.reason("text_only", "language_loss")
    assert "expert 1 not captured" in res.reason("expert_1", "drift")
    assert "no counterfactual" in res.reason("expert_0", "prompt_sensitivity")
    assert "reads no text" in res.reason("expert_1", "language_loss")
    assert "two tasks" in res.missing["probe"]
    data = report.write_report(res, tmp_path / "rep")
    for m in A.METRICS:
        for s in STREAMS:
            entry = data["metrics"][m][s]
            assert entry["per_layer"] is not None or entry["reason"], (m, s)
    assert data["language_loss"]["text_only_language_loss"] is None
    assert data["language_loss"]["measures"]["expert_0"]["measure"] is None
    assert "counterfactual" in data["language_loss"]["measures"]["expert_0"]["reason"]


# --------------------------------------------------------------------------------------------------------------------
# Report files


def check_png(path: pathlib.Path, fig: dict) -> None:
    """A valid PNG of the recorded grid size, decodable by PIL and matplotlib, with something drawn in every panel."""
    from matplotlib import image as mpimg
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == tuple(fig["size_px"]) == P.pixel_size(*fig["grid"]), (path, im.size, fig)
    pixels = mpimg.imread(path)
    rows, cols = fig["grid"]
    assert len(fig["panels"]) <= rows * cols and len(set(fig["panels"])) == len(fig["panels"])
    h, w = pixels.shape[0] // rows, pixels.shape[1] // cols
    for n in range(len(fig["panels"])):
        cell = pixels[(n // cols) * h : (n // cols + 1) * h, (n % cols) * w : (n % cols + 1) * w, :3]
        assert cell.std() > 0.01, (path, fig["panels"][n])


def check_report(out: pathlib.Path, data: dict) -> None:
    assert (out / "report.md").exists() and (out / "metrics.json").exists()
    md = (out / "report.md").read_text()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["figures"].keys() == P.FIGURES.keys()
    for fig in on_disk["figures"].values():
        check_png(out / fig["file"], fig)
        assert f"]({fig['file']})" in md
    for table in report.TABLES:
        assert (out / table).stat().st_size > 0
    for m in A.METRICS:
        for s in STREAMS:
            entry = on_disk["metrics"][m][s]
            assert (entry["per_layer"] is None) == bool(entry.get("reason")), (m, s)


@pytest.mark.slow
def test_report_and_cli_on_synthetic_store(tmp_path):
    syn = Synth()

    def rec(t, k, i):
        r = syn.record(t, k, i)
        cf = syn.record(t, k, i, rng=np.random.default_rng([t, k, i, 1]))
        cf["prompt"] = ""
        return with_cf(r, cf) if i % 2 == 0 else r  # a rerun at every other step, like counterfactual_every=2

    root = build_store(tmp_path / "s", rec, tasks=(0, 1), episodes=3, steps=4)
    spec = importlib.util.spec_from_file_location("ela", REPO / "scripts" / "expert_language_analysis.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules["ela"] = cli  # dataclasses need the module registered
    spec.loader.exec_module(cli)
    # A synthetic manifest names no checkpoint: pass the embedding by checkpoint path would need one, so decode with
    # the synthetic table through the package API, and run the CLI without text decoding.
    res = A.analyze_collection(root, embedding=syn.token_embedding(), probe_shuffles=3, n_boot=200)
    data = report.write_report(res, tmp_path / "rep")
    check_report(tmp_path / "rep", data)
    for m in A.METRICS:
        for s in A.METRICS[m][0]:
            if m == "prompt_decoding":  # blank reruns: refused (a shared "prompt present" bit would decode them)
                assert data["metrics"][m][s]["per_layer"] is None and "blank" in data["metrics"][m][s]["reason"]
                continue
            assert len(data["metrics"][m][s]["per_layer"]) == syn.L, (m, s)
    assert len(data["metrics"]["task_probe"]["expert_1"]["per_layer"]) == syn.L
    sens = np.concatenate(res.step_values[("expert_1", "prompt_sensitivity")])
    assert np.isnan(sens[1::2]).all() and not np.isnan(sens[0::2]).any()  # only the steps with a rerun
    assert data["language_loss"]["overall_loss"] == pytest.approx(
        np.mean(data["language_loss"]["text_only_language_loss"])
    )
    flags = ["--collection", str(root), "--output-dir", str(tmp_path / "cli"), "--no-text-decoding"]
    out = cli.main(tyro.cli(cli.Args, args=[*flags, "--probe-shuffles", "2", "--n-boot", "100"]))
    check_report(tmp_path / "cli", out)
    assert out["metrics"]["language_loss"]["text_only"]["reason"].startswith("text decoding skipped")


def test_pickle_export_gives_the_same_analysis(tmp_path):
    syn = Synth()
    root = build_store(tmp_path / "s", lambda t, k, i: syn.record(t, k, i), steps=3)
    export_pickle(root, tmp_path / "p")
    emb = syn.token_embedding()
    a = A.analyze_collection(root, embedding=emb, probe_shuffles=2)
    with pytest.raises(PermissionError):
        A.analyze_collection(tmp_path / "p", embedding=emb)
    b = A.analyze_collection(tmp_path / "p", embedding=emb, probe_shuffles=2, allow_pickle=True)
    assert a.step_values.keys() == b.step_values.keys()
    for key in a.step_values:
        for x, y in zip(a.step_values[key], b.step_values[key]):
            np.testing.assert_array_equal(x, y)
    assert [p.accuracy for p in a.probes["expert_1"]] == [p.accuracy for p in b.probes["expert_1"]]


# --------------------------------------------------------------------------------------------------------------------
# Memory: one layer at a time

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot, sklearn.linear_model, scipy.stats
    from openpi.latents import analysis, report
    from openpi.latents.analysis.data.embedding import TokenEmbedding
    import expert_data_utils as edu

    small, big, out = sys.argv[1:4]
    emb = TokenEmbedding(np.random.default_rng(0).standard_normal((1024, int(sys.argv[4]))).astype(np.float32),
                         np.zeros(int(sys.argv[4]), np.float32), "random")
    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def phase():  # reset the peak-RSS mark (VmHWM) and return the RSS now; the phase's peak is VmHWM - this
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    # Warm up on a small store so lazy imports, fonts and allocator pools count in the baseline.
    report.write_report(analysis.analyze_collection(small, embedding=emb, probe_shuffles=2, n_boot=100), out + "/w")
    base = phase()
    res = analysis.analyze_collection(big, embedding=emb, probe_shuffles=2, n_boot=100, max_block_bytes=8 << 20)
    report.write_report(res, out + "/r")
    d_analysis = status("VmHWM") - base
    task = edu.load_inference_task_data(big, task_id=0)
    start = phase()
    layer = edu.get_layer_across_steps(task, 0, 5, "expert_0")
    d_layer = status("VmHWM") - start
    start = phase()
    whole = edu.materialize(task["episodes"]["episode_0"])  # the control: everything of one episode in RAM
    d_whole = status("VmHWM") - start
    print(json.dumps({"base": base, "analysis": d_analysis, "layer": d_layer, "whole": d_whole,
                      "layer_nbytes": int(layer.nbytes)}))
    """
)


@pytest.mark.slow
def test_analysis_memory_stays_far_below_an_episode(tmp_path):
    L, W, cams, per_cam, T, steps = 16, 1024, 3, 80, 16, 32
    syns = {n: Synth(L=n, W=W, T=T, n_valid=6, V=1024) for n in (2, L)}

    def rec(t, k, i, L=L):
        rng = np.random.default_rng([t, k, i])
        r = syns[L].record(t, k, i, rng=rng)
        r["expert_0_hidden_states"] = rng.standard_normal((L, 1, cams * per_cam + T, W), np.float32).astype(BF16)
        r.pop("expert_0_segment_means")
        return r

    small = build_store(tmp_path / "small", lambda t, k, i: rec(t, k, i, L=2), steps=2)
    t0 = time.monotonic()
    big = build_store(
        tmp_path / "big", rec, tasks=(0, 1), episodes=1, steps=steps, manifest={"text_start": cams * per_cam}
    )
    write_s = time.monotonic() - t0
    episode_bytes = sum(f.stat().st_size for f in (big / "task_000" / "episode_0").rglob("*") if f.is_file())
    raw_episode = steps * (L * (cams * per_cam + T) * W * 2 + L * T * W * 2)
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(small), str(big), str(tmp_path), str(W)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    summary = (
        f"episode {raw_episode / mib:.0f} MiB raw ({episode_bytes / mib:.0f} MiB on disk), collection "
        f"{2 * raw_episode / mib:.0f} MiB; written in {write_s:.1f}s; baseline RSS {m['base'] / mib:.0f} MiB; "
        f"peak RSS increase: full analysis + report {m['analysis'] / mib:.0f} MiB, one-layer query "
        f"{m['layer'] / mib:.0f} MiB (array {m['layer_nbytes'] / mib:.0f} MiB), whole episode "
        f"loaded {m['whole'] / mib:.0f} MiB"
    )
    print(summary)
    # Measured: 42 MiB before the pooled metrics (probe, lens, CKA), centred drift and the extra report figures, 80 MiB
    # after (of a 272 MiB episode): still bounded by one layer's block plus the pooled sample, not by the episode.
    # Since the bf16 precision floor (issue 18) the peak reads 114-121 MiB (open: not yet traced to its allocation);
    # still bounded by blocks, far below the episode's 272 MiB that the control below needs.
    assert m["analysis"] < raw_episode / 2, summary
    assert m["layer"] < raw_episode / 4, summary
    assert m["whole"] > 0.9 * raw_episode, summary  # the control does need the episode's worth of RAM


# --------------------------------------------------------------------------------------------------------------------
# End to end: collect on LIBERO with the tiny preset, then the CLI


@pytest.mark.libero
@pytest.mark.slow
def test_end_to_end_collection_and_report(tmp_path):
    coll, out = tmp_path / "coll", tmp_path / "report"
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "inference_latent_collection.py"),
            "--preset",
            "pi0_libero_tiny",
            "--task-suite",
            "libero_goal",
            "--task-ids",
            "0",
            "1",
            "--episodes-per-task",
            "2",
            "--max-steps",
            "20",
            "--counterfactual",
            "blank",
            "--output-dir",
            str(coll),
        ],
        check=True,
        timeout=400,
        cwd=tmp_path,
        capture_output=True,
    )
    t1 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "expert_language_analysis.py"),
            "--collection",
            str(coll),
            "--output-dir",
            str(out),
            "--probe-shuffles",
            "5",
            "--n-boot",
            "500",
        ],
        timeout=400,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"collection {t1 - t0:.0f}s, report {time.monotonic() - t1:.0f}s")
    data = json.loads((out / "metrics.json").read_text())
    check_report(out, data)
    assert data["source"]["n_tasks"] == 2 and data["source"]["n_episodes"] == 4
    L = 4  # the tiny preset's depth
    expected = {
        "language_loss": ["text_only"],
        "text_accuracy": ["text_only"],
        "logit_nll": ["text_only"],
        "logit_rank": ["text_only"],
        "logit_top1": ["text_only"],
        "prompt_sensitivity": list(STREAMS),
        "drift": list(STREAMS),
        "centred_drift": list(STREAMS),
        "attention_to_text": ["expert_1"],
    }
    for m, have in expected.items():
        for s in STREAMS:
            v = data["metrics"][m][s]["per_layer"]
            assert (v is not None) == (s in have), (m, s)
            if v is not None:
                assert len(v) == L and all(x is not None and np.isfinite(x) for x in v), (m, s, v)
    for s in STREAMS:
        assert len(data["metrics"]["task_probe"][s]["per_layer"]) == L
    m = data["metrics"]
    assert m["text_accuracy"]["text_only"]["per_layer"][0] == 1.0  # layer 0 is the embedding
    assert all(0 <= x <= 1 for x in m["attention_to_text"]["expert_1"]["per_layer"])
    assert all(0 <= x <= 2 for d in ("drift", "centred_drift") for s in STREAMS for x in m[d][s]["per_layer"])
    assert m["prompt_sensitivity"]["text_only"]["per_layer"][0] == 0.0  # BOS, before any attention
    assert m["prompt_sensitivity"]["expert_0"]["per_layer"][0] == 0.0  # image tokens before any attention
    ll = data["language_loss"]
    assert len(ll["text_only_language_loss"]) == L and ll["overall_loss"] == pytest.approx(
        np.mean(ll["text_only_language_loss"])
    )
    assert ll["measures"]["expert_1"]["measure"] == "prompt_sensitivity"
    figures = data["figures"]
    heat = [f"{s}: {x}" for x in P.HEATMAP_METRICS for s in expected[x]]
    assert figures["heatmaps"]["panels"] == heat and figures["success_failure"]["panels"] == heat
    # Blank reruns refuse prompt decoding (a shared "prompt present" bit would name the prompt), so no panel for it.
    assert all(data["metrics"]["prompt_decoding"][s]["per_layer"] is None for s in STREAMS)
    curves = [x for x in P.CURVE_METRICS if x != "prompt_decoding"]
    assert figures["layer_curves"]["panels"] == [f"{x} per layer" for x in curves] + [
        f"task probe accuracy per layer: {s}" for s in STREAMS
    ]
    assert figures["probe"]["panels"] == [f"task probe: {s}" for s in STREAMS]
    assert figures["prompt_sensitivity"]["panels"] == [f"prompt sensitivity: {s}" for s in STREAMS] + [
        "action divergence under the counterfactual prompt"
    ]
    assert len(figures["attention_to_text"]["panels"]) == 3 and len(figures["overview"]["panels"]) == 6


# --------------------------------------------------------------------------------------------------------------------
# Masked cameras, manifests in pickles, episodes without steps, denoising-step ids, the success-split window

CAMS, PER_CAM, N_TEXT = 3, 4, 8  # full expert-0 capture: 3 cameras of 4 tokens, then the text window
TEXT_START = CAMS * PER_CAM


def full_capture_record(syn: Synth, t, k, i, *, seg_mask=True, cf=True, cam2_task_signal=0.0):
    """Full expert-0 capture: cameras 0 and 1 hold ones (constant over steps), camera 2 is masked (pi0 LIBERO's right
    wrist) and holds step- and prompt-dependent garbage. The counterfactual doubles camera 0 and keeps camera 1, so
    over the valid cameras ‖a − b‖/‖a‖ = sqrt(4W) / sqrt(8W) = 1/√2 exactly, and drift over the valid cameras is 0."""
    rng = np.random.default_rng([t, k, i, 3])
    r = syn.record(t, k, i)
    text = r.pop("text_only_hidden_states")
    r.pop("expert_0_segment_means")

    def prefix(cam0):
        img = np.ones((syn.L, 1, TEXT_START, syn.W), np.float32)
        img[:, :, :PER_CAM] = cam0
        img[:, :, 2 * PER_CAM :] = 5 * rng.standard_normal((syn.L, 1, PER_CAM, syn.W)) + cam2_task_signal * t
        return np.concatenate([img.astype(BF16), text], axis=2)

    r["expert_0_hidden_states"] = prefix(1.0)
    mask = np.array([[True, True, False, True]])
    if seg_mask:
        r["segment_mask"] = mask
    if cf:
        r["cf_prompt"] = ""
        r["cf_expert_0_hidden_states"] = prefix(2.0)
        r["cf_text_mask"], r["cf_tokenized_prompt"] = r["text_mask"], r["tokenized_prompt"]
        if seg_mask:
            r["cf_segment_mask"] = mask
    return r


FULL_MANIFEST = {"text_start": TEXT_START}


@pytest.mark.slow
def test_masked_camera_is_left_out_of_expert0_sensitivity_drift_and_probe(tmp_path):
    syn = Synth(L=3, W=8, T=N_TEXT)
    kw = dict(tasks=(0, 1), episodes=3, steps=3)
    stored = build_store(
        tmp_path / "stored", lambda t, k, i: full_capture_record(syn, t, k, i, cam2_task_signal=3.0), **kw,
        manifest=FULL_MANIFEST,
    )  # fmt: skip
    res = A.analyze_collection(stored, embedding=None, probe_shuffles=2, n_boot=50)
    e0 = res.streams["expert_0"]
    assert (e0.mode, e0.n_cams, e0.tokens_per_camera, e0.segment_mask_stored) == ("full", 3, 4, True)
    sens = np.concatenate(res.step_values[("expert_0", "prompt_sensitivity")])
    np.testing.assert_allclose(sens, 1 / np.sqrt(2), rtol=1e-12)
    assert np.all(np.concatenate(res.step_values[("expert_0", "drift")]) == 0.0)
    # The masked camera carries the task (3 · task id); the valid cameras are constant: nothing left to decode.
    assert not res.probes["expert_0"][0].accuracy >= 0.9
    data = report.write_report(res, tmp_path / "rep")
    assert data["streams"]["expert_0"]["camera_validity"] == "segment_mask"
    # The seed view of one step masks the same way.
    step = make_source(stored).store.task_data(0)["episodes"]["episode_0"]["rollout_steps"]["step_5"]
    one = analyze_rollout_step(step, embedding=None, manifest={"segment_names": SEGMENTS, **FULL_MANIFEST})
    np.testing.assert_allclose(one["expert_0_language_loss"], [1 / np.sqrt(2)] * syn.L, rtol=1e-12)

    # A store written before segment_mask existed: every camera counts (noted, whatever the preset) and the garbage
    # shows up: what segment_mask removes.
    blind = build_store(
        tmp_path / "blind",
        lambda t, k, i: full_capture_record(syn, t, k, i, seg_mask=False, cam2_task_signal=3.0),
        **kw,
        manifest={**FULL_MANIFEST, "preset": "pi0_libero"},
    )
    res_blind = A.analyze_collection(blind, embedding=None, probe_shuffles=2, n_boot=50)
    assert "every camera is treated as valid" in res_blind.notes["expert_0.cameras"]
    assert not res_blind.streams["expert_0"].segment_mask_stored
    blind_sens = np.concatenate(res_blind.step_values[("expert_0", "prompt_sensitivity")])
    assert np.all(np.abs(blind_sens - 1 / np.sqrt(2)) > 0.1)
    assert np.all(np.concatenate([v[1:] for v in res_blind.step_values[("expert_0", "drift")]]) > 0.1)
    assert res_blind.probes["expert_0"][0].accuracy >= 0.9


def test_pooled_probe_features_drop_the_masked_camera():
    from openpi.latents.analysis.data import streams as src

    stream = src.Stream("expert_0", "expert_0_segment_means", "pooled", 1, (0,), False, n_cams=3)
    x = np.arange(2 * 1 * 3 * 2, dtype=np.float32).reshape(2, 1, 3, 2) + 1  # [steps, B, cams, W]
    x[:, :, 2] = 0  # what the capture stores for an all-masked segment
    cam = src.camera_valid(stream, np.array([[[True, True, False, True]]] * 2), (2, 1))
    feats = src.drop_invalid_cameras(stream, src.probe_features(stream, x, cam_valid=cam), cam.reshape(-1, 3))
    np.testing.assert_array_equal(feats, x[:, 0, :2].reshape(2, 4))


def test_pickles_carry_the_manifest_layer_ids_and_camera_layout(tmp_path):
    import pickle

    from openpi.latents.store.pickle_format import PickleTaskWriter, pickle_files
    from openpi.latents.store.reader import materialize

    syn = Synth(L=3, W=8, T=N_TEXT)
    manifest = {**FULL_MANIFEST, "capture_spec": {"layers": [0, 9, 17]}, "arguments": {"num_denoise_steps": 2}}
    root = build_store(tmp_path / "s", lambda t, k, i: full_capture_record(syn, t, k, i), steps=2, manifest=manifest)
    store_res = A.analyze_collection(root, embedding=None, probe=False, n_boot=50)
    assert all(store_res.layers(s) == [0, 9, 17] for s in STREAMS) and not store_res.notes
    (path0, _) = export_pickle(root, tmp_path / "p")
    with open(path0, "rb") as f:
        assert pickle.load(f)["manifest"]["capture_spec"] == {"layers": [0, 9, 17]}
    res = A.analyze_collection(tmp_path / "p", embedding=None, probe=False, n_boot=50, allow_pickle=True)
    assert all(res.layers(s) == [0, 9, 17] and res.streams[s].layer_kind == "model" for s in STREAMS)
    assert res.streams["expert_0"].n_cams == 3
    for key in store_res.step_values:
        for x, y in zip(store_res.step_values[key], res.step_values[key]):
            np.testing.assert_array_equal(x, y)

    # A pickle written before the manifest was stored: layers labelled by capture position, and the result says so.
    old = {}
    for t, path in sorted(pickle_files(tmp_path / "p").items()):
        with open(path, "rb") as f:
            old[t] = pickle.load(f)
        del old[t]["manifest"]
    res_old = A.analyze_collection(old, embedding=None, probe=False, n_boot=50)
    for s in STREAMS:
        assert res_old.layers(s) == [0, 1, 2] and res_old.streams[s].layer_kind == "capture_position"
        assert "capture position" in res_old.notes[f"{s}.layers"] and "no run manifest" in res_old.notes[f"{s}.layers"]
    assert res_old.streams["expert_0"].n_cams == 3  # from the stored segment_mask
    data = report.write_report(res_old, tmp_path / "rep")
    assert data["streams"]["expert_0"]["layer_ids"] == "capture_position"
    assert data["notes"].items() >= res_old.notes.items()  # metrics.json adds the report's method notes
    assert "capture position" in (tmp_path / "rep" / "report.md").read_text()

    # No manifest, but the count equals the depth of every named Gemma variant of that width: model ids, with a note.
    tiny = Synth(L=4, W=64)
    tiny_root = build_store(tmp_path / "tiny", lambda t, k, i: tiny.record(t, k, i), tasks=(0,), steps=2)
    data = materialize(make_source(tiny_root).store.task_data(0))
    res_tiny = A.analyze_collection(data, embedding=None, probe=False, n_boot=50)
    assert res_tiny.streams["expert_1"].layer_kind == "model" and res_tiny.layers("expert_1") == [0, 1, 2, 3]
    assert "dummy" in res_tiny.notes["expert_1.layers"] and "width 64" in res_tiny.notes["expert_1.layers"]

    # PickleTaskWriter stores the manifest it is given (what a --output-format pickle collection passes).
    task = {"task_id": 5, "task_name": "t5", "suite": "synthetic", "language": "do task 5"}
    writer = PickleTaskWriter(tmp_path / "w", task, manifest={"segment_names": SEGMENTS, **manifest})
    ep = writer.begin_episode(0)
    for i in range(2):
        ep.append_step(full_capture_record(syn, 5, 0, i))
    ep.finish({"success": True})
    res_w = A.analyze_collection(tmp_path / "w", embedding=None, probe=False, n_boot=50, allow_pickle=True)
    assert res_w.layers("expert_0") == [0, 9, 17] and res_w.source["manifest"]["segment_names"] == SEGMENTS


def test_episodes_without_steps_and_errored_episodes(tmp_path):
    syn = Synth()
    a = np.zeros(syn.W, np.float32)
    a[:4] = 1.0

    def rec(t, k, i):
        r = syn.record(t, k, 0)  # every step identical: drift 0 ...
        r["t"] = 5 * i
        if k == 3:  # ... except the episode that ended with an env.step error: expert 1 turns to -a (drift 2)
            r["expert_1_segment_means"] = np.broadcast_to(a if i == 0 else -a, (syn.S, syn.L, 1, 2, syn.W)).astype(BF16)
        return r

    errors = {0: "env.reset failed: RuntimeError: boom", 3: "env.step failed at t=10: RuntimeError: boom"}
    root = build_store(
        tmp_path / "s",
        rec,
        tasks=(0,),
        episodes=5,
        steps=lambda t, k: 0 if k == 0 else 3,
        success=lambda t, k: k == 1,
        error=lambda t, k: errors.get(k),
    )
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=50)
    assert set(res.streams) == set(STREAMS)  # discovered from the first episode with steps
    assert res.step_values[("expert_1", "drift")][0].shape == (0, syn.L)
    assert np.all(np.isnan(res.per_episode("expert_1", "drift")[0]))
    assert res.source["episodes_without_steps"] == [{"task_id": 0, "episode": 0, "error": errors[0]}]
    # The success split leaves both errored episodes out: the failures left (episodes 2, 4) do not drift.
    assert res.split_counts() == (1, 2)
    assert all(x.failure.estimate == 0.0 and x.n_failure == 2 for x in res.success_split("expert_1", "drift"))
    assert res.per_episode("expert_1", "drift")[3, 0] == 2.0  # but it is in the per-episode values
    data = report.write_report(res, tmp_path / "rep")
    check_report(tmp_path / "rep", data)
    info = data["metrics"]["success_split"]
    # default window is "step" since issue 18 (equal rollout steps) (no common step count: n_inferences None)
    assert [e["episode"] for e in info["excluded_errored"]] == [0, 3] and info["n_inferences"] is None
    assert info["window"] == "step"
    assert data["source"]["n_errored"] == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert errors[0] in md and errors[3] in md and "2 episode(s) that ended with an error left out" in md

    # Only episodes without steps: nothing to compute, and the report says why.
    empty = build_store(tmp_path / "e", rec, tasks=(0,), episodes=2, steps=0, error=lambda t, k: errors[0])
    res = A.analyze_collection(empty, embedding=None, probe=False)
    assert not res.streams and "no episode has a rollout step" in res.reason("expert_1", "drift")


def test_denoising_step_ids_from_the_capture_spec(tmp_path):
    syn = Synth(S=2)
    manifest = {"capture_spec": {"denoise_steps": [0, 9]}, "arguments": {"num_denoise_steps": 10}}
    root = build_store(tmp_path / "s", lambda t, k, i: syn.record(t, k, i), tasks=(0,), steps=2, manifest=manifest)
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=50)
    report.write_report(res, tmp_path / "rep")
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert data["metrics"]["attention_by_denoise_step"]["denoise_steps"] == [0, 9]
    assert data["metrics"]["attention_by_denoise_step"]["denoise_step_ids"] == "model"
    import csv

    rows = list(csv.DictReader(open(tmp_path / "rep" / "attention.csv")))
    assert sorted({(r["denoise_step"], r["capture_position"]) for r in rows}) == [("0", "0"), ("9", "1")]
    # Negative ids resolve with num_steps (here 5); no capture_spec: capture positions, noted.
    assert resolve_denoise_steps({"capture_spec": {"denoise_steps": [-1]}, "arguments": {"num_denoise_steps": 5}}, 1)[
        :2
    ] == ((4,), "model")
    ids, kind, note = resolve_denoise_steps({}, 2)
    assert (ids, kind) == ((0, 1), "capture_position") and "capture position" in note


def drift_patterns(W):
    a, b = np.zeros(W, np.float32), np.zeros(W, np.float32)
    a[:4], b[4:8] = 1.0, 1.0
    return [a, a + b, b, -a]  # cosines to step 0: 1, 1/√2, 0, −1 → drift 0, 1 − 1/√2, 1, 2


@pytest.mark.slow
def test_success_split_compares_a_common_window_of_rollout_steps(tmp_path):
    """Drift grows with the rollout step the same way in every episode; failures run 4 steps, successes 2. Over the
    common window (2 steps) success − failure is exactly 0; whole-episode means would show a gap from length alone."""
    syn = Synth()
    patterns = drift_patterns(syn.W)
    rng = np.random.default_rng(0)

    def rec(t, k, i):
        r = syn.record(t, k, i)
        e1 = np.broadcast_to(patterns[i], (syn.S, syn.L, 1, 2, syn.W)).copy()
        e1[0] = rng.standard_normal(e1[0].shape)  # denoising step 0 is the fresh per-inference noise
        r["expert_1_segment_means"] = e1.astype(BF16)
        return r

    root = build_store(
        tmp_path / "s",
        rec,
        tasks=(0,),
        episodes=4,
        steps=lambda t, k: 2 if k < 2 else 4,
        success=lambda t, k: k < 2,
    )
    res = A.analyze_collection(root, embedding=None, probe=False, n_boot=100, success_window="common")
    assert res.settings.stats.success_window == "common" and res.split_window() == 2
    d1 = 1 - 1 / np.sqrt(2)
    # expert_1 drift is read at the last captured denoising step: the step-0 noise does not enter.
    np.testing.assert_allclose(res.step_values[("expert_1", "drift")][3][:, 0], [0, d1, 1, 2], atol=1e-6)
    for x in res.success_split("expert_1", "drift"):
        assert x.success.estimate == pytest.approx(d1) and x.failure.estimate == pytest.approx(d1)
        assert x.difference.estimate == pytest.approx(0.0, abs=1e-12)
    for x in res.success_split("expert_1", "drift", window="all"):
        assert x.difference.estimate == pytest.approx(d1 - (d1 + 1 + 2) / 3)
    data = report.write_report(res, tmp_path / "rep")
    assert data["metrics"]["success_split"]["n_inferences"] == 2
    assert data["metrics"]["success_relation"]["drift"]["expert_1"]["per_layer"][0]["difference"]["estimate"] == 0.0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "first 2 rollout steps" in md and report.DRIFT_NOTE in md and report.TEXT_CF_NOTE in md
    rows = (tmp_path / "rep" / "success_split.csv").read_text().splitlines()
    assert rows[0].endswith(",window_steps") and all(r.endswith(",2") for r in rows[1:])
    res_all = A.analyze_collection(root, embedding=None, probe=False, n_boot=100, success_window="all")
    assert res_all.split_window() is None
