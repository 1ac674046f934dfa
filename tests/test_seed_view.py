"""The seed plan's notebooks on this project's collections: `--capture seed` + `expert_data_utils.seed_view`.

Collections are made by the real collection CLI (tiny random-weight preset, one short real LIBERO episode).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import expert_data_utils
from openpi.models.capture import CaptureSpec, split_capture_preset
from openpi.policies import presets

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET, STEPS = "pi0_libero_tiny", 3
pytestmark = pytest.mark.libero


def collect(out: pathlib.Path, *capture: str, max_steps: int) -> pathlib.Path:
    cmd = [sys.executable, str(REPO / "scripts" / "inference_latent_collection.py"), "--preset", PRESET,
           "--task-suite", "libero_goal", "--task-ids", "0", "--episodes-per-task", "1", "--max-steps", str(max_steps),
           "--num-denoise-steps", str(STEPS), "--no-store-images", "--output-dir", str(out), *capture]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def seed_cell(path, depth: int) -> list:
    """A notebook cell written to the seed plan (its access path and loops), unchanged."""
    task_data = expert_data_utils.load_seed_task_data(path, task_id=0)
    episode = task_data["episodes"]["episode_0"]
    rows = []
    for step_key, step in episode["rollout_steps"].items():
        for layer_idx in range(depth):
            h0 = step["expert_0_hidden_states"][layer_idx]
            h1 = step["expert_1_hidden_states"][layer_idx]
            rows.append((step_key, step["timestep"], layer_idx, h0, h1, step["action"]))
    return rows, episode["metadata"]["success"], episode["metadata"]["total_steps"]


def test_seed_cell_runs_on_a_seed_collection_and_names_the_flag_on_a_pooled_one(tmp_path):
    config = presets.get_preset(PRESET).model_config
    seed_store = collect(tmp_path / "seed", "--capture", "seed", max_steps=10)
    rows, success, total_steps = seed_cell(seed_store, config.depth)
    assert len(rows) == 2 * config.depth and success is False and total_steps == 10  # inferences at t = 0, 5
    raw = expert_data_utils.load_inference_task_data(seed_store, task_id=0)["episodes"]["episode_0"]["rollout_steps"]
    for step_key, t, layer, h0, h1, action in rows:
        stored = raw[step_key]
        assert step_key == f"step_{t}"
        assert h0.shape == (1, config.prefix_len, config.paligemma_config.width)
        np.testing.assert_array_equal(h0, stored["expert_0_hidden_states"][layer])
        # layer-first expert 1 at the stated denoising step (default: the last of the STEPS), all steps still there
        assert stored["expert_1_hidden_states"].shape[:2] == (STEPS, config.depth)
        np.testing.assert_array_equal(h1, stored["expert_1_hidden_states"][STEPS - 1][layer])
        np.testing.assert_array_equal(action, stored["actions"])
    first = expert_data_utils.load_seed_task_data(seed_store, 0, denoise_step=0)["episodes"]["episode_0"]
    step = first["rollout_steps"]["step_0"]
    np.testing.assert_array_equal(step["expert_1_hidden_states"], raw["step_0"]["expert_1_hidden_states"][0])
    assert step["expert_1_hidden_states_all_steps"].shape[0] == STEPS
    assert set(step["observation"]) == {"observation/state", "prompt"}  # images not stored in this run

    pooled_store = collect(tmp_path / "pooled", max_steps=5)  # the default capture: pooled means
    with pytest.raises(KeyError, match="--capture seed") as info:
        seed_cell(pooled_store, config.depth)
    assert "expert_0_segment_means (pooled means) instead" in str(info.value)


def test_capture_seed_on_the_command_line():
    spec, rest = split_capture_preset(["--preset", "x", "--capture", "seed", "--capture.dtype", "float32"])
    assert spec == CaptureSpec(expert_0="full", expert_1="full", attention_to_text=False, trajectory=False)
    assert rest == ["--preset", "x", "--capture.dtype", "float32"]  # single fields still change on top of it
    assert split_capture_preset(["--capture=off"])[0].is_off
    with pytest.raises(ValueError, match="unknown capture preset"):
        split_capture_preset(["--capture", "sead"])
    # The documented size per inference at full size (bf16), from the config's arithmetic: 82.5 MB.
    full = presets.get_preset("pi0_libero").model_config
    e0 = full.depth * full.prefix_len * full.paligemma_config.width * 2
    e1 = 10 * full.depth * (1 + full.action_horizon) * full.action_expert_config.width * 2
    text = full.depth * full.max_token_len * full.paligemma_config.width * 2
    assert (e0, e1, text) == (60_162_048, 18_800_640, 3_538_944)
    assert round((e0 + e1 + text) / 1e6, 1) == 82.5 and "82.5 MB" in (CaptureSpec.seed.__doc__ or "")
