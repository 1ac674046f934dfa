"""Teacher-forced counterfactual reruns (issue 10, item 4): collection flag, store round trip, the per-denoising-step
analysis of expert-1 prompt sensitivity (free-running vs teacher-forced) and its report section.

Known answers: layer 0 of expert 1 is the embedded (state, x_t, time), which holds no prompt, so with the baseline's
x_t fed (teacher-forced) its prompt sensitivity is exactly 0 at every denoising step; free-running, it is exactly 0 at
step 0 (both runs start from the same noise) and > 0 after (the runs' x_t diverge). Planted arrays check the
arithmetic of the analysis. No simulator: the synthetic collection with the positive control organism, and the
LIBERO recorder fed generated observations.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from openpi.latents import collect as collection
from openpi.latents import schema, store
from openpi.latents import synthetic_collection as sc
from openpi.latents.analysis import analyze_collection
from openpi.latents.analysis.run.denoise_sensitivity import METRIC
from openpi.latents.recording.reruns import check_teacher_forced
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config

REPO = pathlib.Path(__file__).resolve().parents[1]
ORGANISM = REPO / "tests" / "data" / "organisms" / "positive"
TF = schema.teacher_forced


# ---------------------------------------------------------------------------------------------------------------------
# The setup check


def test_check_names_each_missing_piece_and_passes_good_combinations():
    bad = CaptureSpec(expert_1="off", trajectory=False)
    with pytest.raises(ValueError) as info:
        check_teacher_forced(True, "none", bad)
    msg = str(info.value)
    for fix in ("--counterfactual-teacher-forced", "--counterfactual blank", "--capture.no-trajectory",
                "--capture.expert-1 pooled"):  # fmt: skip
        assert fix in msg, (fix, msg)
    with pytest.raises(ValueError, match="trajectory") as info:
        check_teacher_forced(True, "blank", CaptureSpec(trajectory=False))
    assert "--counterfactual blank" not in str(info.value)  # only what is missing is named
    check_teacher_forced(True, "other-task", CaptureSpec(expert_1="full"))
    check_teacher_forced(False, "none", bad)  # off: nothing to check


def test_collect_refuses_a_bad_combination_before_loading_the_policy(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(policy_config, "create_trained_policy", lambda *a, **k: loads.append(a))
    out = tmp_path / "out"
    args = collection.CollectionArgs(
        preset="pi0_libero_tiny", task_ids=(0,), episodes_per_task=1, max_steps=5, output_dir=out,
        counterfactual="none", counterfactual_teacher_forced=True,
    )  # fmt: skip
    with pytest.raises(collection.SetupError, match="--counterfactual blank"):
        collection.collect(args)
    assert loads == [] and not out.exists()


def test_synthetic_collection_refuses_a_bad_combination():
    with pytest.raises(ValueError, match=r"CaptureSpec\(trajectory=True\)"):
        sc.SyntheticCollection(("a", "b"), capture=CaptureSpec(trajectory=False), teacher_forced=True)
    with pytest.raises(ValueError, match="counterfactual='blank'"):
        sc.SyntheticCollection(("a", "b"), counterfactual="none", teacher_forced=True)


# ---------------------------------------------------------------------------------------------------------------------
# The analysis on planted arrays (arithmetic known answers)


def _planted(teacher_forced: bool = True) -> dict:
    """2 tasks × 2 episodes × 2 rollout steps, pooled expert 1 [S=3, L=2, B=1, 2, W=4]; a rerun at rollout step 0
    only. Free-running rerun: the action segment scaled by 1 + 0.1·(s+1) at every layer → sensitivity 0.1·(s+1).
    Teacher-forced: layer 0 unchanged, layer 1 scaled by 1.5 → 0 and 0.5. The state segment is scaled by 10 in both
    reruns: it must not enter."""
    rng = np.random.default_rng(0)

    def step(i: int) -> dict:
        base = rng.uniform(1, 2, (3, 2, 1, 2, 4)).astype(np.float32)
        rec = {"expert_1_segment_means": base, "denoise_times": np.array([1.0, 2 / 3, 1 / 3], np.float32)}
        if i == 0:
            free = base.copy()
            free[..., 1, :] *= (1 + 0.1 * np.arange(1, 4, dtype=np.float32))[:, None, None, None]
            free[..., 0, :] *= 10
            rec[schema.counterfactual("expert_1_segment_means")] = free
            if teacher_forced:
                tf = base.copy()
                tf[:, 1, :, 1, :] *= 1.5
                tf[..., 0, :] *= 10
                rec[TF("expert_1_segment_means")] = tf
        return rec

    def episode():
        return {"metadata": {"success": True}, "rollout_steps": {f"step_{5 * i}": step(i) for i in range(2)}}

    manifest = {"suffix_segment_names": ["state", "actions"]}
    return {
        t: {"task_id": t, "manifest": manifest, "episodes": {f"episode_{k}": episode() for k in range(2)}}
        for t in range(2)
    }


def test_planted_values_per_denoising_step_and_layer():
    res = analyze_collection(_planted(), embedding=None, probe=False, pooled=False, n_boot=200)
    free, tf = res.denoise_sensitivity["free"], res.denoise_sensitivity["teacher_forced"]
    want_free = np.repeat(0.1 * np.arange(1, 4)[:, None], 2, axis=1)  # [S, L]
    np.testing.assert_allclose(free.estimate, want_free, rtol=1e-6)
    np.testing.assert_allclose(free.low, want_free, rtol=1e-6)  # the same in every episode: a zero-width interval
    np.testing.assert_allclose(tf.estimate, np.array([[0.0, 0.5]] * 3), rtol=1e-6)
    assert np.all(tf.estimate[:, 0] == 0.0)  # exactly
    for d in (free, tf):
        assert (d.n_tasks, d.n_episodes, d.n_reruns, d.unit) == (2, 4, 4, "task")
        assert d.reason is None and "state token left out" in d.tokens
    assert tf.key == "cf_tf_expert_1_segment_means" and free.key == "cf_expert_1_segment_means"


def test_missing_teacher_forced_reruns_are_nan_with_the_reason_and_the_report_says_so(tmp_path):
    from openpi.latents.report import write_report

    res = analyze_collection(_planted(teacher_forced=False), embedding=None, probe=False, pooled=False, n_boot=50)
    tf = res.denoise_sensitivity["teacher_forced"]
    assert np.all(np.isnan(tf.estimate)) and "--counterfactual-teacher-forced" in tf.reason
    assert "--counterfactual-teacher-forced" in res.missing[f"expert_1.{METRIC}.teacher_forced"]
    data = write_report(res, tmp_path / "report")
    entry = data["metrics"][METRIC]
    assert entry["teacher_forced"]["per_step_layer"] is None and "--counterfactual-teacher-forced" in entry[
        "teacher_forced"]["reason"]  # fmt: skip
    assert entry["free"]["per_step_layer"] is not None
    assert "teacher-forced rerun not available" in data["statistics"][METRIC]["control"]


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the positive control organism, a synthetic collection with teacher-forced reruns, the store, the analysis
# and the report


CAPTURE = CaptureSpec(expert_0="off", expert_1="full", text=False, attention_to_text=False, trajectory=True)
NUM_STEPS = 4


def _observe(rng: np.random.Generator, prompt: str) -> dict:
    from openpi.training import control_organisms as co

    obs = co.raw_observations(rng, 1)[0]
    del obs["prompt"]
    return obs


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    from openpi.training import control_organisms as co

    policy = policy_config.create_trained_policy("pi0_organism_tiny", ORGANISM, sample_kwargs={"num_steps": NUM_STEPS})
    spec = sc.SyntheticCollection(co.PROMPTS[:3], n_episodes=2, n_steps=2, capture=CAPTURE, seed=3, teacher_forced=True)
    root = sc.collect_synthetic(policy, tmp_path_factory.mktemp("tf") / "store", spec, _observe, progress=False)
    res = analyze_collection(root, embedding=None, probe=False, pooled=False, n_boot=200)
    return root, res


@pytest.mark.slow
def test_stored_teacher_forced_records_read_back(organism_run):
    root, _ = organism_run
    opened = store.open_store(root)
    assert opened.manifest["arguments"]["counterfactual_teacher_forced"] is True
    data = store.load_inference_task_data(root, 0)
    steps = data["episodes"]["episode_0"]["rollout_steps"]
    step = steps[sorted(steps)[0]]
    e1 = "expert_1_hidden_states"
    for key in (e1, "actions", "model_actions", "x_t", "v_t"):
        assert TF(key) in step and step[TF(key)].shape == step[key].shape and step[TF(key)].dtype == step[key].dtype
    # the rerun was fed the baseline's x_t at every step; its last entry is its own x_0
    np.testing.assert_array_equal(step[TF("x_t")][:NUM_STEPS], step["x_t"][:NUM_STEPS])
    assert not np.array_equal(step[TF("x_t")][NUM_STEPS], step["x_t"][NUM_STEPS])  # the prompt changed the action
    assert not np.array_equal(step[schema.counterfactual("x_t")][1], step["x_t"][1])  # free-running diverged


@pytest.mark.slow
def test_teacher_forced_layer0_is_exactly_zero_at_every_denoising_step(organism_run):
    """The acceptance of issue 10 item 4, through the whole pipeline."""
    _, res = organism_run
    free, tf = res.denoise_sensitivity["free"], res.denoise_sensitivity["teacher_forced"]
    assert free.estimate.shape == tf.estimate.shape == (NUM_STEPS, res.streams["expert_1"].n_layers)
    assert np.all(tf.per_episode[:, :, 0] == 0.0) and np.all(tf.estimate[:, 0] == 0.0)
    assert np.all(free.per_episode[:, 0, 0] == 0.0)  # step 0: same noise, same x_t
    assert np.all(free.estimate[1:, 0] > 1e-3)  # trajectory divergence, not the prompt
    assert np.all(tf.estimate[:, -1] > 1e-3)  # the prompt still acts on the deeper layers
    assert (tf.n_tasks, tf.n_episodes, tf.n_reruns, tf.unit) == (3, 6, 12, "task")
    print(json.dumps({v: {"layer0": d.estimate[:, 0].tolist(), "last_layer": d.estimate[:, -1].tolist()}
                      for v, d in res.denoise_sensitivity.items()}))  # fmt: skip


@pytest.mark.slow
def test_report_section_figure_and_metrics_json(organism_run, tmp_path):
    from openpi.latents.report import write_report

    _, res = organism_run
    data = write_report(res, tmp_path / "report")
    entry = json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"][METRIC]
    assert [row[0] for row in entry["teacher_forced"]["per_step_layer"]] == [0.0] * NUM_STEPS
    assert entry["teacher_forced"]["n_tasks"] == 3 and entry["free"]["unit_of_resampling"] == "task"
    assert data["figures"]["denoise_sensitivity"]["grid"] == [2, 2]
    assert (tmp_path / "report" / "denoise_sensitivity.png").stat().st_size > 0
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Expert-1 prompt sensitivity per denoising step", 1)[1].split("\n## ", 1)[0]
    assert "(0 by construction)" in section and "unit of resampling task (cluster bootstrap); 3 tasks, 6 episodes" in (
        section
    )  # fmt: skip
    assert "control: the teacher-forced rerun (cf_tf_*" in section and "*Definition:" in section
    assert "denoise_sensitivity.png" in section


# ---------------------------------------------------------------------------------------------------------------------
# The LIBERO recorder (EpisodeRecorder.accept: the sequential and --num-envs paths) without the simulator


class _ListSink:
    def __init__(self):
        self.records = []

    def append_step(self, record):
        self.records.append(record)

    def finish(self, metadata):
        pass


@pytest.mark.slow
def test_recorder_stores_cf_tf_fields_at_rerun_inferences_and_the_size_estimate_counts_them(tmp_path):
    from openpi.latents.collect import sizes
    from openpi.latents.collect.args import make_plan
    from openpi.latents.collect.episode import EpisodeRecorder

    steps = 3
    args = collection.CollectionArgs(
        preset="pi0_libero_tiny", task_ids=(0,), episodes_per_task=1, max_steps=10, output_dir=tmp_path,
        num_denoise_steps=steps, counterfactual="blank", counterfactual_every=2, counterfactual_teacher_forced=True,
        capture=CaptureSpec(expert_0="off", text=False, attention_to_text=False),
    )  # fmt: skip
    plan = make_plan(args)
    policy = policy_config.create_trained_policy("pi0_libero_tiny", sample_kwargs={"num_steps": steps})
    sink = _ListSink()
    recorder = EpisodeRecorder(plan, policy, sink, plan.tasks[0], 0)
    rng = np.random.default_rng(0)
    sim = plan.simulator
    for t in (0, 5, 10):
        element = {key: rng.integers(0, 256, sim.image_shape, dtype=np.uint8) for key in sim.camera_keys.values()}
        element |= {sim.state_key: rng.normal(size=8).astype(np.float32), "prompt": plan.tasks[0].language}
        recorder.policy_fn(element)
        recorder.on_inference(t, element, None)
    with_rerun, without, again = sink.records
    tf_keys = {k for k in with_rerun if k.startswith(schema.CF_TF_PREFIX)}
    assert TF("expert_1_segment_means") in tf_keys and TF("x_t") in tf_keys and TF("actions") in tf_keys
    assert not any(k.startswith(schema.CF_PREFIX) for k in without) and tf_keys <= set(again)
    np.testing.assert_array_equal(with_rerun[TF("x_t")][:steps], with_rerun["x_t"][:steps])
    e1 = with_rerun[TF("expert_1_segment_means")]  # [S, L, B, 2, W]: layer 0 identical to the baseline's
    np.testing.assert_array_equal(e1[:, 0], with_rerun["expert_1_segment_means"][:, 0])
    # With a rerun at every inference, the size estimate's teacher-forced share is the bytes of the cf_tf_* latents
    # one record holds (cf_tf_actions / cf_tf_model_actions are not latents).
    latents = sum(schema.nbytes(v.shape, v.dtype) for k, v in with_rerun.items() if k in tf_keys and not
                  k.endswith("actions"))  # fmt: skip
    on, off = (_replace(plan, counterfactual_every=1, counterfactual_teacher_forced=x) for x in (True, False))
    assert sizes.estimate_size(on, policy).per_inference - sizes.estimate_size(off, policy).per_inference == latents
    # the sparse cf_tf_* keys (rollout steps 0 and 2 only) go into a real store and read back
    with store.LatentStoreWriter.create_or_open(tmp_path / "store", {"kind": "test"}, resume=False) as writer:
        task = {"task_id": 0, "task_name": "t0", "suite": "libero_goal", "language": plan.tasks[0].language}
        ep = writer.begin_episode(task, 0, {"prompt": plan.tasks[0].language})
        for record in sink.records:
            ep.append_step(record)
        ep.finish({"success": False, "total_steps": 10, "error": None, "num_inferences": 3})
    opened = store.open_store(tmp_path / "store")
    assert opened.episode(0, 0).present_steps(TF("x_t")) == [0, 2]
    got = opened.read_array(0, 0, TF("expert_1_segment_means"), steps=[0, 2])
    np.testing.assert_array_equal(got[0], with_rerun[TF("expert_1_segment_means")])


def _replace(plan, **changes):
    return dataclasses.replace(plan, args=dataclasses.replace(plan.args, **changes))
