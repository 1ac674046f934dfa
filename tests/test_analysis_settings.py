"""AnalysisSettings: one frozen value for the main and the control analysis; every setting reaches the control.

The bug this guards (issue 17): the control analysis was given a hand-picked subset of the settings and silently ran
with the defaults of the rest (include_constant_tokens / progress_bins / n_permutations = True / 3 / 7 ran the control
with False / 10 / 1000). The test sets EVERY setting to a non-default value (the dict below must name every field, so
a new setting fails here until it is added) and checks the control's results against a stand-alone analysis of the
control collection with the same settings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from openpi.latents.analysis import AnalysisSettings, TokenEmbedding, analyze_collection
from openpi.latents.analysis.run import settings as settings_lib

# A non-default value for every setting (all small enough for a 3-task, 2-episode, 3-step collection).
NON_DEFAULT = {
    "task_ids": (0, 1, 2),
    "allow_pickle": True,
    "skip_damaged": True,
    "max_block_bytes": 1 << 10,  # one rollout step per block
    "text_step_stride": 2,
    "include_constant_tokens": True,
    "probe": True,  # the default; probe=False is its own case below
    "probe_splits": 2,
    "probe_shuffles": 2,
    "n_boot": 50,
    "seed": 3,
    "n_permutations": 7,
    "success_window": "common",
    "progress_bins": 3,
    "pooled": True,  # the default; pooled=False is its own case below
    "pooled_split": "episode",
    "pooled_steps_per_episode": 3,
    "pooled_max_rows": 40,
    "cka_rows": 20,
    "lens_eval_rows": 16,
    "token_probe_control": "slot",  # the only choice
}
OWN_CASE = {"probe": False, "pooled": False}  # defaults True: the run above keeps them, these turn them off


def _collection(seed: int) -> dict:
    """Three tasks × two episodes × three rollout steps, every stream, a counterfactual rerun at every step."""
    rng = np.random.default_rng(seed)

    def step(t: int, i: int) -> dict:
        ids = np.array([[1, 2 + t, 3 + i, 4, 0]], np.int32)
        rec = {
            "text_mask": np.array([[True, True, True, True, False]]),
            "tokenized_prompt": ids,
            "text_only_hidden_states": rng.standard_normal((2, 1, 5, 4)).astype(np.float32),
            "expert_0_segment_means": rng.standard_normal((2, 1, 3, 4)).astype(np.float32),
            "segment_mask": np.array([[True, False, True]]),
            "expert_1_segment_means": rng.standard_normal((2, 2, 1, 2, 4)).astype(np.float32),
            "attention_to_text": rng.uniform(0, 1, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_to_text_content": rng.uniform(0, 0.5, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_to_bos": rng.uniform(0, 0.5, (2, 2, 1, 2, 3)).astype(np.float32),
            "attention_key_counts": np.broadcast_to(np.float32([9, 3, 1, 1]), (2, 1, 2, 3, 4)).copy(),
            "denoise_times": np.array([1.0, 0.5], np.float32),
            "actions": rng.standard_normal((2, 3)).astype(np.float32),
        }
        cf = {f"cf_{k}": v for k, v in rec.items() if k != "denoise_times" and not k.startswith("attention_")}
        cf["cf_tokenized_prompt"] = ids + np.array([[0, 8, 0, 0, 0]], np.int32)
        return {**rec, **cf}

    return {
        t: {
            "task_id": t,
            "episodes": {
                f"episode_{k}": {
                    "metadata": {"success": (k + t) % 2 == 0},
                    "rollout_steps": {f"step_{5 * i}": step(t, i) for i in range(3)},
                }
                for k in range(2)
            },
        }
        for t in range(3)
    }


def _embedding() -> TokenEmbedding:
    emb = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    return TokenEmbedding(emb, np.zeros(4, np.float32), "test")


def _leaf_fields() -> dict[str, object]:
    """{setting: default} over every group of AnalysisSettings."""
    return {f.name: f.default for cls in AnalysisSettings.groups().values() for f in dataclasses.fields(cls)}


def test_every_setting_is_named_here_and_has_a_non_default_value():
    defaults = _leaf_fields()
    assert set(NON_DEFAULT) == set(defaults)  # a new setting must be added to this test
    changed = {k for k, v in NON_DEFAULT.items() if v != defaults[k]}
    assert changed | set(OWN_CASE) | {"token_probe_control"} == set(defaults)
    assert all(OWN_CASE[k] != defaults[k] for k in OWN_CASE)


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a, float), np.asarray(b, float), equal_nan=True)


def test_every_setting_reaches_the_control():
    settings = AnalysisSettings().replace(**NON_DEFAULT)
    emb = _embedding()
    main_data, control_data = _collection(0), _collection(1)
    res = analyze_collection(main_data, settings, embedding=emb, control=control_data, control_embedding=emb)
    assert res.control is not None and res.control.settings == settings == res.settings
    assert res.control.settings.flat() == {**NON_DEFAULT, "task_ids": list(NON_DEFAULT["task_ids"])}

    # The control's numbers are those of the control collection analysed on its own with the same settings ...
    alone = analyze_collection(control_data, settings, embedding=emb)
    assert set(res.control.step_values) == set(alone.step_values)
    for key, per_episode in alone.step_values.items():
        assert all(_same(a, b) for a, b in zip(res.control.step_values[key], per_episode)), key
    assert [p.p_value for p in res.control.probes["text_only"]] == [p.p_value for p in alone.probes["text_only"]]
    assert res.control.pooled.keys() == alone.pooled.keys()

    # ... and the three settings the control used to drop change them (so the comparison above could fail).
    default_control = analyze_collection(control_data, embedding=emb, n_boot=50)
    loss = ("text_only", "language_loss")
    assert not all(_same(a, b) for a, b in zip(res.control.step_values[loss], default_control.step_values[loss]))
    assert res.control.progress_values(*loss).shape[1] == 3 and default_control.progress_values(*loss).shape[1] == 10
    # n_permutations=7: the probe's permutation p-value has the floor 1/(7+1) (default 1000: 1/1001)
    p_control = [p.p_value for p in res.control.probes["text_only"] if p.p_value is not None]
    assert p_control and min(p_control) >= 1 / 8 - 1e-12
    ws = res.control.within_task_split(*loss)
    assert all(w.p_value is None or np.isnan(w.p_value) or w.p_value >= 1 / 8 - 1e-12 for w in ws)


@pytest.mark.parametrize("name", sorted(OWN_CASE))
def test_switches_reach_the_control(name):
    emb = _embedding()
    res = analyze_collection(
        _collection(0), embedding=emb, control=_collection(1), control_embedding=emb, n_boot=20, **{name: False}
    )
    assert res.control.settings == res.settings and res.control.settings.flat()[name] is False
    if name == "probe":
        assert res.probes == {} and res.control.probes == {}
    else:
        assert res.pooled == {} and res.control.pooled == {}


def test_settings_are_checked_when_built_and_unknown_names_refused():
    with pytest.raises(ValueError, match="success_window must be one of"):
        AnalysisSettings().replace(success_window="late")
    with pytest.raises(ValueError, match="progress_bins must be >= 1"):
        AnalysisSettings(stats=settings_lib.StatisticsSettings(progress_bins=0))
    with pytest.raises(TypeError, match=r"unknown analysis settings \['n_bootstrap'\]"):
        AnalysisSettings().replace(n_bootstrap=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AnalysisSettings().stats.n_boot = 5  # type: ignore[misc]
