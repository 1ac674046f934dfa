"""The notebook module: importable from anywhere, lazy loading, one-layer accessors, seed-style language loss."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_analysis import BF16, Synth, build_store, with_cf

import expert_data_utils as edu


def test_importable_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import expert_data_utils as e; print(len(e.__all__))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(edu.__all__)
    for name in edu.__all__:
        assert callable(getattr(edu, name)) or isinstance(getattr(edu, name), type), name


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    syn = Synth(L=3, W=16)

    def rec(t, k, i):
        r = syn.record(t, k, i)
        if i % 2 == 0:  # counterfactual reruns at even steps
            cf = syn.record(t, k, i, rng=np.random.default_rng([t, k, i, 7]))
            cf["prompt"] = ""
            r = with_cf(r, cf)
        return r

    root = build_store(tmp_path_factory.mktemp("edu") / "s", rec, tasks=(0, 1), episodes=2, steps=4)
    return root, syn


def test_listing_and_lazy_loading(store):
    root, _ = store
    tasks = edu.list_tasks(root)
    assert [t["task_id"] for t in tasks] == [0, 1] and all(t["n_episodes"] == 2 for t in tasks)
    assert tasks[0]["language"] == "do task 0"
    task = edu.load_inference_task_data(root, task_id=1)
    assert edu.list_episodes(task) == ["episode_0", "episode_1"]
    assert edu.rollout_steps(task, 0) == [0, 5, 10, 15] == edu.rollout_steps(task, "episode_0")
    assert task["episodes"]["episode_1"]["metadata"]["success"] is False


def test_one_layer_accessors_match_the_step_views(store):
    root, _ = store
    task = edu.load_inference_task_data(root, task_id=0)
    steps = task["episodes"]["episode_1"]["rollout_steps"]
    for expert, key in (
        ("text_only", "text_only_hidden_states"),
        ("expert_0", "expert_0_segment_means"),
        ("expert_1", "expert_1_segment_means"),
        ("attention_to_text", "attention_to_text"),
    ):
        layer_axis = 1 if key in ("expert_1_segment_means", "attention_to_text") else 0
        stacked = np.stack([np.take(steps[s][key], 2, axis=layer_axis) for s in steps])
        across = edu.get_layer_across_steps(task, 1, 2, expert)
        assert across.dtype == stacked.dtype and across.shape == stacked.shape
        np.testing.assert_array_equal(across.astype(np.float32), stacked.astype(np.float32))
        one = edu.get_hidden_states_for_dimensions(task, "episode_1", "step_10", 2, expert)
        np.testing.assert_array_equal(one.astype(np.float32), stacked[2].astype(np.float32))
    cf = edu.get_layer_across_steps(task, 1, 0, "expert_1", counterfactual=True)
    assert cf.shape[0] == 2  # the two steps with a rerun
    np.testing.assert_array_equal(
        cf[1].astype(np.float32), steps["step_10"]["cf_expert_1_segment_means"][:, 0].astype(np.float32)
    )
    with pytest.raises(KeyError, match="step_3"):
        edu.get_hidden_states_for_dimensions(task, 1, 3, 0, "text_only")
    with pytest.raises(KeyError, match="expert_0_hidden_states"):
        edu.get_layer_across_steps(task, 1, 0, "expert_0_hidden_states")
    assert edu.get_hidden_states_for_dimensions(task, 0, 5, 0, "text_only").dtype == BF16


def test_language_loss_views_store_and_pickle(store, tmp_path):
    root, syn = store
    emb = syn.token_embedding()
    task = edu.load_inference_task_data(root, task_id=0)
    per_step = edu.analyze_language_loss_across_rollout_steps(task, embedding=emb)
    ep = per_step["episodes"]["episode_0"]
    assert ep["step_t"] == [0, 5, 10, 15]
    loss = np.array(ep["text_only_language_loss"])
    assert loss.shape == (4, syn.L) and np.all(loss[:, 0] == 0.0)  # layer 0 holds the embedding
    np.testing.assert_allclose(ep["overall_loss"], loss.mean(1))
    e1 = np.array(ep["expert_1_language_loss"], dtype=float)
    assert np.isnan(e1[1::2]).all() and not np.isnan(e1[0::2]).any()  # prompt sensitivity where a rerun exists
    assert per_step["measures"]["expert_0"]["measure"] == "prompt_sensitivity"
    assert np.array(per_step["by_rollout_step"]["text_only_language_loss"]).shape == (syn.L, 4)
    # One step through the seed's function equals that step's row.
    step = task["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    one = edu.analyze_rollout_step(step, embedding=emb)
    np.testing.assert_allclose(one["text_only_language_loss"], loss[2])
    np.testing.assert_allclose(one["expert_1_language_loss"], e1[2])
    summary = edu.analyze_inference_language_loss(task, embedding=emb)
    assert set(summary["per_episode"]) == {"episode_0", "episode_1"}
    assert summary["overall_loss"] == pytest.approx(np.mean(summary["text_only_language_loss"]))
    # Pickle export: same numbers (and no manifest, so the embedding must be passed).
    edu.export_pickle(root, tmp_path / "p")
    ptask = edu.load_inference_task_data(tmp_path / "p", task_id=0, allow_pickle=True)
    psum = edu.analyze_inference_language_loss(ptask, embedding=emb)
    for slot in ("text_only_language_loss", "expert_0_language_loss", "expert_1_language_loss"):
        np.testing.assert_allclose(psum[slot], summary[slot])
    no_emb = edu.analyze_inference_language_loss(ptask)
    assert no_emb["text_only_language_loss"] is None and no_emb["overall_loss"] is None
    assert "checkpoint" in no_emb["measures"]["text_only"]["reason"]
    step_p = ptask["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    np.testing.assert_allclose(
        edu.get_layer_across_steps(ptask, 0, 1, "expert_0").astype(np.float32),
        edu.get_layer_across_steps(task, 0, 1, "expert_0").astype(np.float32),
    )
    assert edu.analyze_rollout_step(step_p, embedding=None)["text_only_language_loss"] is None
