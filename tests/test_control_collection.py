"""The matched control collection (`openpi.latents.replay`, scripts/replay_collection.py) and the control in the
report (`openpi.latents.report.control`).

Without the simulator: the replay's refusals (before any model loads), the report's control values on synthetic
stores (an identical control must give back the model's own values), and a synthetic store of the positive control
organism replayed with the negative organism (a second checkpoint) and with itself. With LIBERO (module fixture
`runs`): a tiny collection (fixture checkpoint, libero_goal task 0, 2 episodes x 10 env steps = 2 inferences each,
each with a counterfactual rerun) replayed three ways: with its own checkpoint (must reproduce it bit for bit), with a
random-initialised model (the default control), and the same random replay interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from openpi.latents import replay as R
from openpi.latents import store
from openpi.latents.recording.interrupt import Interrupted, StopOnSignal
from openpi.models.capture import CaptureSpec
from openpi.policies import presets

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:robosuite"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]
REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = REPO / "tests" / "data" / "pi0_tiny_a" / "checkpoint"  # params/ and assets/test/
TINY = presets.get_preset("pi0_libero_tiny").model_config
# What the model produces (the control's own values) vs what the replay copies from the source.
MODEL_KEYS = ("actions", "model_actions", "text_only_hidden_states", "expert_0_segment_means", "expert_1_segment_means")


def _script():
    spec = importlib.util.spec_from_file_location("replay_collection", REPO / "scripts" / "replay_collection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replay_collection"] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------------------
# Refusals, before any model loads (hand-made stores with a collection's manifest)


def _fake_source(root: pathlib.Path, *, images: bool = True, **manifest_changes) -> pathlib.Path:
    manifest = {
        "kind": "pi0 LIBERO latent collection",
        "arguments": {"num_denoise_steps": 2, "seed": 7},
        "capture_spec": CaptureSpec().to_dict(),
        "checkpoint": "random(seed=0)",
        "preset": "pi0_libero_tiny",
        "model_config": TINY.describe(),
        "condition": {"name": "baseline", "prompt_mode": "task", "intervention": None},
        **manifest_changes,
    }
    task = {"task_id": 0, "task_name": "t0", "suite": "libero_goal", "language": "open the drawer"}
    with store.LatentStoreWriter.create_or_open(root, manifest, resume=False) as writer:
        ep = writer.begin_episode(task, 0, {"prompt": task["language"]})
        for t in (0, 5):
            record = {"t": t, "prompt": task["language"], "state": np.zeros(8, np.float32)}
            record["noise"] = np.zeros((TINY.action_horizon, TINY.action_dim), np.float32)
            if images:
                record |= {k: np.zeros((224, 224, 3), np.uint8) for k in ("image", "wrist_image")}
            ep.append_step(record)
        ep.finish({"success": False, "total_steps": 10, "error": None})
    return root


@pytest.mark.parametrize(
    ("images", "changes", "message"),
    [
        (False, {}, r"no stored images \(image, wrist_image\).*--no-store-images.*--store-images"),
        (True, {"condition": {"name": "ko", "intervention": {"spec": "knockout-text"}}}, "Replay the paired baseline"),
        (True, {"model_config": "Pi0Config(paligemma=gemma_2b)"}, "a control needs the source's config"),
        (True, {"arguments": {}}, "how many denoising steps"),
        (True, {"checkpoint": "random(seed=1)"}, "is the source's own model.*--allow-same-model"),
    ],
)
def test_replay_refuses_bad_sources_before_loading(tmp_path, images, changes, message):
    src = _fake_source(tmp_path / "src", images=images, **changes)
    with pytest.raises(ValueError, match=message):
        R.make_plan(R.ReplayArgs(source=str(src), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing written


def test_replay_cli_exits_2_naming_the_flag(tmp_path, capsys):
    src = _fake_source(tmp_path / "src", images=False)
    with pytest.raises(SystemExit) as e:
        _script().main(R.ReplayArgs(source=str(src), output_dir=str(tmp_path / "out")))
    assert e.value.code == 2 and "--store-images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script().main(R.ReplayArgs(source=str(tmp_path / "missing"), output_dir=str(tmp_path / "out")))
    assert "not a readable latent store" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_replay_plan_records_what_it_is_a_control_of(tmp_path):
    src = _fake_source(tmp_path / "src")
    plan = R.make_plan(R.ReplayArgs(source=str(src), output_dir=str(tmp_path / "out"), init_seed=3))
    man, source_man = plan.manifest, store.open_store(src).manifest
    assert man.checkpoint == "random(seed=3)" and man.kind == R.KIND
    assert man.control_of["content_hash"] == source_man["content_hash"]
    assert man.control_of["checkpoint"] == "random(seed=0)"
    assert man.replay["init_seed"] == 3 and man.replay["num_denoise_steps"] == 2
    assert man.capture_spec == source_man["capture_spec"] and man.model_config == TINY.describe()
    assert plan.episodes == ((0, 0),) and plan.preset.param_seed == 3 and plan.checkpoint is None


# --------------------------------------------------------------------------------------------------------------------
# The control in the report, on synthetic stores


@pytest.mark.slow
def test_report_carries_the_control_values(tmp_path):
    from test_analysis import Synth, build_store, with_cf

    from openpi.latents import analysis as A
    from openpi.latents import report

    syn = Synth()

    def rec(t, k, i):
        cf = syn.record(t, k, i, rng=np.random.default_rng([t, k, i, 1]))
        return with_cf(syn.record(t, k, i), cf | {"prompt": ""})

    model = build_store(tmp_path / "model", rec, tasks=(0, 1), episodes=3, steps=3)
    content_hash = store.open_store(model).manifest["content_hash"]
    # The identity control: the same records, marked as a replay of this collection. Every control value must then
    # equal the model's own value (same data, same settings, same seed).
    same = build_store(tmp_path / "same", rec, tasks=(0, 1), episodes=3, steps=3,
                       manifest={"control_of": {"content_hash": content_hash, "store": str(model)}})  # fmt: skip
    fast = dict(n_boot=50, n_permutations=50, pooled=False, probe_splits=2, probe_shuffles=1)
    res = A.analyze_collection(
        model, embedding=syn.token_embedding(), control=same, control_label="identity",
        control_embedding=syn.token_embedding(), **fast,
    )  # fmt: skip
    data = report.write_report(res, tmp_path / "rep")
    on_disk = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    for metric, stream in (("language_loss", "text_only"), ("prompt_sensitivity", "expert_1"), ("drift", "expert_0")):
        entry = on_disk["metrics"][metric][stream]
        assert entry["control"]["label"] == "identity" and entry["control"]["layers"] == entry["layers"]
        np.testing.assert_array_equal(entry["control"]["per_layer"], entry["per_layer"])
    acc = on_disk["metrics"]["task_probe"]["expert_1"]
    assert acc["control"]["accuracy"] == [p["accuracy"] for p in acc["per_layer"]]
    assert on_disk["control"]["matching"].startswith("matched replay")
    md = (tmp_path / "rep" / "report.md").read_text()
    stats = data["statistics"]
    for figure in ("layer_curves", "probe", "prompt_sensitivity", "attention_to_text", "heatmaps", "success_failure"):
        values = stats[figure]["control_collection"]["values"]
        assert values, figure
        for v in values:  # the identity control reads exactly what this model reads
            assert v["control"] == pytest.approx(v["model"], nan_ok=True), (figure, v)
        assert stats[figure]["control"].startswith("identity (matched replay") and stats[figure]["control"] in md
    assert "; within this collection: " in stats["probe"]["control"] and "best layer" in stats["probe"]["control"]

    # Another control (other records, not a replay): its values differ, and the report says it is not matched.
    other = build_store(tmp_path / "other", lambda t, k, i: rec(t, k, i + 10), tasks=(0, 1), episodes=3, steps=3)
    res2 = A.analyze_collection(model, embedding=syn.token_embedding(), probe=False, control=other,
                                control_embedding=syn.token_embedding(), **fast)  # fmt: skip
    data2 = report.write_report(res2, tmp_path / "rep2")
    entry = data2["metrics"]["prompt_sensitivity"]["expert_1"]
    assert not np.allclose(entry["control"]["per_layer"], entry["per_layer"])
    assert "a separate collection (not a replay" in data2["statistics"]["layer_curves"]["control"]


# --------------------------------------------------------------------------------------------------------------------
# Without a simulator: a synthetic store of the positive control organism, replayed with the negative organism (a
# second checkpoint of the same config) and with itself


ORGANISMS = REPO / "tests" / "data" / "organisms"


def _observe(rng: np.random.Generator, prompt: str) -> dict:
    from openpi.training import control_organisms as co

    obs = co.raw_observations(rng, 1)[0]
    del obs["prompt"]
    return obs


@pytest.mark.slow
def test_synthetic_organism_store_replayed_with_a_second_checkpoint(tmp_path):
    from openpi.latents import analysis as A
    from openpi.latents import report
    from openpi.latents import synthetic_collection as sc
    from openpi.policies import policy_config
    from openpi.training import control_organisms as co

    positive = policy_config.create_trained_policy("pi0_organism_tiny", ORGANISMS / "positive")
    capture = CaptureSpec(text=False, attention_to_text=False)  # pooled experts + trajectory (x_t gives the steps)
    spec = sc.SyntheticCollection(co.PROMPTS, n_episodes=2, n_steps=2, capture=capture, seed=3, store_images=True)
    src = sc.collect_synthetic(positive, tmp_path / "positive", spec, _observe, progress=False)
    assert store.open_store(src).manifest["arguments"]["num_steps"] is None  # replay reads 10 steps off x_t
    neg = R.replay(
        R.ReplayArgs(source=str(src), output_dir=str(tmp_path / "negative"), checkpoint=str(ORGANISMS / "negative"))
    )
    same_args = R.ReplayArgs(
        source=str(src),
        output_dir=str(tmp_path / "same"),
        checkpoint=str(ORGANISMS / "positive"),
        allow_same_model=True,
    )
    same = R.replay(same_args, policy=positive)
    assert neg.steps == same.steps == 4 * 2 * 2
    man = store.open_store(tmp_path / "negative").manifest
    assert man["replay"]["num_denoise_steps"] == 10 and man["checkpoint"] == str((ORGANISMS / "negative").resolve())
    a, b, c = _episodes(src), _episodes(tmp_path / "same"), _episodes(tmp_path / "negative")
    _assert_same_structure(a, c, keys=("t", "prompt", "cf_prompt", "noise", "state", "image", "wrist_image"))
    for ident, ep in a.items():
        for key in ep.keys():
            np.testing.assert_array_equal(b[ident].read(key), ep.read(key), err_msg=key)
        assert not np.allclose(c[ident].read("model_actions"), ep.read("model_actions"), atol=1e-2)
    # The matched negative organism as the control: the positive organism's expert-1 prompt sensitivity is far above
    # it at its peak layer (the organisms' known answer: > 3x, tests/test_control_organisms.py).
    res = A.analyze_collection(src, embedding=None, probe=False, pooled=False, n_boot=50, n_permutations=50,
                               control=tmp_path / "negative", control_label="negative organism")  # fmt: skip
    data = report.write_report(res, tmp_path / "rep")
    values = data["statistics"]["prompt_sensitivity"]["control_collection"]["values"]
    peak = next(v for v in values if (v["stream"], v["metric"]) == ("expert_1", "prompt_sensitivity"))
    assert peak["model"] > 3 * peak["control"], peak
    assert data["control"]["matching"].startswith("matched replay")


# --------------------------------------------------------------------------------------------------------------------
# Real LIBERO: a tiny collection and its replays


@dataclasses.dataclass
class Runs:
    source: pathlib.Path
    same: pathlib.Path  # replayed with the source's own checkpoint
    random: pathlib.Path  # replayed with a random-initialised model (init seed 1)
    resumed: pathlib.Path  # the same random replay, interrupted after 2 steps and resumed
    summaries: dict


class _StopAfter(StopOnSignal):
    """Acts as if SIGINT arrived after ``n`` rollout steps."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def check(self) -> None:
        self.n -= 1
        if self.n < 0:
            raise Interrupted(signal.SIGINT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from openpi.envs import libero as L
    from openpi.latents import collect as collection

    root = tmp_path_factory.mktemp("control")
    args = collection.CollectionArgs(
        preset="pi0_libero_tiny", checkpoint=str(TINY_CHECKPOINT), asset_id="test", task_suite="libero_goal",
        task_ids=(0,), episodes_per_task=2, max_steps=10, num_denoise_steps=2, counterfactual="other-task",
        seed=L.DEFAULT_SEED, output_dir=str(root / "source"),
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        collection.collect(args)
    summaries = {}
    same = R.ReplayArgs(
        source=args.output_dir, output_dir=str(root / "same"), checkpoint=str(TINY_CHECKPOINT), allow_same_model=True
    )
    summaries["same"] = R.replay(same)
    with contextlib.redirect_stdout(io.StringIO()):
        summaries["random"] = _script().main(R.ReplayArgs(source=args.output_dir, output_dir=str(root / "random")))
    resumed = R.ReplayArgs(source=args.output_dir, output_dir=str(root / "resumed"))
    policy = R.load_policy(R.make_plan(resumed))  # one random init (~20 s of compiling on 2 busy cores) for both runs
    with pytest.raises(Interrupted):
        R.replay(resumed, stop=_StopAfter(2), policy=policy)
    summaries["resumed"] = R.replay(dataclasses.replace(resumed, resume=True), policy=policy)
    return Runs(root / "source", root / "same", root / "random", root / "resumed", summaries)


def _episodes(path):
    s = store.open_store(path)
    return {(t, k): s.episode(t, k) for t in s.task_ids() for k in s.episode_indices(t)}


def _assert_same_structure(src, ctrl, keys=("t", "prompt", "cf_prompt", "noise", "state", "image", "wrist_image",
                                             "executed_actions")):  # fmt: skip
    assert ctrl.keys() == src.keys()
    for ident, a in src.items():
        b = ctrl[ident]
        assert b.committed == a.committed and b.step_t == a.step_t, ident
        assert set(b.keys()) == set(a.keys()), set(b.keys()) ^ set(a.keys())
        for key in a.keys():
            assert b.present_steps(key) == a.present_steps(key), key
            fa, fb = a.fields[key], b.fields[key]
            assert (tuple(fb.shape), fb.dtype) == (tuple(fa.shape), fa.dtype), key
        for key in keys:
            np.testing.assert_array_equal(b.read(key), a.read(key), err_msg=key)  # the inputs are the source's
        assert b.metadata["success"] == a.metadata["success"]
        assert b.metadata["total_steps"] == a.metadata["total_steps"]


@pytest.mark.libero
def test_replay_keeps_tasks_episodes_steps_prompts_and_noise(runs):
    src = _episodes(runs.source)
    assert len(src) == 2 and all(ep.committed == 2 for ep in src.values())  # t = 0, 5: two inferences each
    assert all(ep.present_steps("cf_prompt") == [0, 1] for ep in src.values())
    for path in (runs.same, runs.random, runs.resumed):
        _assert_same_structure(src, _episodes(path))
    man = store.open_store(runs.random).manifest
    assert man["checkpoint"] == "random(seed=1)" and man["replay"]["init_seed"] == 1
    assert man["control_of"]["content_hash"] == store.open_store(runs.source).manifest["content_hash"]
    assert man["capture_spec"] == store.open_store(runs.source).manifest["capture_spec"]
    assert runs.summaries["random"].steps == 4 and runs.summaries["resumed"].kept == ((0, 0),)


@pytest.mark.libero
def test_replay_with_the_source_checkpoint_reproduces_it_bit_for_bit(runs):
    """Same uint8 images, float32 state, prompt tokens and noise through the same jitted program on the same
    backend: the stored actions and latents (bf16 as stored), and the counterfactual reruns', come back identical."""
    src, same = _episodes(runs.source), _episodes(runs.same)
    assert store.open_store(runs.same).manifest["replay"]["same_model_as_source"] is True
    for ident, a in src.items():
        for key in a.keys():
            np.testing.assert_array_equal(same[ident].read(key), a.read(key), err_msg=f"{ident} {key}")


@pytest.mark.libero
def test_random_init_control_differs_and_resume_reproduces_it(runs):
    src, rnd, resumed = _episodes(runs.source), _episodes(runs.random), _episodes(runs.resumed)
    for ident, a in src.items():
        for key in MODEL_KEYS + tuple(f"cf_{k}" for k in MODEL_KEYS):
            x, y = a.read(key).astype(np.float32), rnd[ident].read(key).astype(np.float32)
            assert not np.allclose(x, y, atol=1e-3), f"{ident} {key}: the random-init control equals the source"
        for key in a.keys():  # an interrupted and resumed replay writes the same store as an uninterrupted one
            np.testing.assert_array_equal(resumed[ident].read(key), rnd[ident].read(key), err_msg=key)


@pytest.mark.libero
def test_report_with_the_replayed_control(runs, tmp_path):
    from openpi.latents import analysis as A
    from openpi.latents import report

    kw = dict(n_boot=50, n_permutations=50, pooled_steps_per_episode=2)
    res = A.analyze_collection(runs.source, control=runs.random, control_label="random init", **kw)
    data = report.write_report(res, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert data["control"]["checkpoint"] == "random(seed=1)" and data["control"]["matching"].startswith("matched")
    for metric, stream in (("language_loss", "text_only"), ("prompt_sensitivity", "expert_1"), ("drift", "expert_0")):
        entry = data["metrics"][metric][stream]
        assert len(entry["control"]["per_layer"]) == len(entry["per_layer"]) == TINY.depth
        assert entry["control"]["per_layer"] != entry["per_layer"]
    stats = data["statistics"]["prompt_sensitivity"]
    values = {(v["stream"], v["metric"]): v for v in stats["control_collection"]["values"]}
    sens = data["metrics"]["prompt_sensitivity"]["expert_1"]
    j = int(np.nanargmax(sens["per_layer"]))
    at_peak = values[("expert_1", "prompt_sensitivity")]
    assert at_peak["statistic"] == f"at layer {sens['layers'][j]} (this model's peak)"
    assert at_peak["control"] == pytest.approx(sens["control"]["per_layer"][j])
    assert "*Statistics:" in md and "control: random init (matched replay" in md
    # The same-model replay as the control reads exactly this model's values (a known answer for the wiring).
    res_same = A.analyze_collection(runs.source, control=runs.same, pooled=False, **kw)
    for metric, stream in (("language_loss", "text_only"), ("prompt_sensitivity", "expert_1")):
        model = [c.estimate for c in res_same.per_layer(stream, metric)]
        np.testing.assert_array_equal([c.estimate for c in res_same.control.per_layer(stream, metric)], model)


def test_replay_refusal_of_a_damaged_source_names_only_flags_the_replay_cli_has(tmp_path, capsys):
    """Issue 19 item 12: the refusal said "Pass --skip-damaged", which replay_collection.py rejects."""
    src = _fake_source(tmp_path / "src")
    (src / "task_000" / "episode_0" / "state" / "c" / "1" / "0").unlink()
    with pytest.raises(SystemExit) as e:
        _script().main(R.ReplayArgs(source=str(src), output_dir=str(tmp_path / "out")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "state/c/1/0" in err, err
    assert "--skip-damaged" not in err and "--resume" in err
    flags = set(re.findall(r"(--[a-z][a-z-]+)", err))
    help_text = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "replay_collection.py"), "--help"], capture_output=True, text=True
    ).stdout
    assert flags - {"--resume"} <= set(re.findall(r"(--[a-z][a-z.-]+)", help_text)), flags  # --resume: the collection's
