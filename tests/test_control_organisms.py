"""The control organisms and the known-answer test of the whole analysis pipeline.

The committed organisms (tests/data/organisms, made by scripts/train_control_organisms.py) are tiny pi0s trained on
a synthetic task where the target action chunk is chosen by the prompt (positive) or by the state, with the prompt
drawn independently (negative). The pipeline (policy → synthetic collection with counterfactual reruns → latent store
→ analysis, and the text knockout) must find the prompt used by the first and not by the second.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from openpi import transforms as _transforms
from openpi.latents import synthetic_collection as sc
from openpi.latents.analysis import analyze_collection
from openpi.latents.analysis.metrics.prompt_decoding import matched_prompt_decoding
from openpi.models import intervention as iv
from openpi.models import tokenizer as _tokenizer
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config
from openpi.shared import normalize as _normalize
from openpi.training import control_organisms as co
from openpi.training import flow_matching as fm

ORGANISMS = pathlib.Path(__file__).parent / "data" / "organisms"
PRESET = "pi0_organism_tiny"


def _observe(rng: np.random.Generator, prompt: str) -> dict:
    obs = co.raw_observations(rng, 1)[0]
    del obs["prompt"]
    return obs


@pytest.fixture(scope="module")
def policies():
    return {kind: policy_config.create_trained_policy(PRESET, ORGANISMS / kind) for kind in co.KINDS}


# ---------------------------------------------------------------------------------------------------------------------
# The organisms are what they claim to be


def test_checkpoints_are_small_and_documented():
    for kind in co.KINDS:
        files = [p for p in (ORGANISMS / kind).rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) < 5 << 20
        record = json.loads((ORGANISMS / kind / "organism.json").read_text())
        assert record["kind"] == kind and record["preset"] == PRESET
        assert record["loss_last_10"] < record["loss_first_10"] / 3


def test_model_batch_is_what_the_policy_transforms_build():
    """The training inputs equal the policy's input transforms applied to the same raw observation."""
    preset = policy_config.get_preset(PRESET)
    config = preset.model_config
    tokenizer = _tokenizer.PaligemmaTokenizer(config.max_token_len, preset.tokenizer_path)
    norm_stats = _normalize.load(preset.default_norm_stats_dir)
    inputs, _ = policy_config.make_transforms(preset, norm_stats, tokenizer)
    raws = co.raw_observations(np.random.default_rng(3), 2)
    obs, actions = co.model_batch(
        co.OrganismTask("positive"), config, raws, co.tokenize_prompts(tokenizer), co.target_chunks(10)
    )
    for b, raw in enumerate(raws):
        want = _transforms.compose(inputs)(dict(raw))
        for key in want["image"]:
            got = obs.images[key][b]
            expected = want["image"][key].astype(np.float32) / 255.0 * 2.0 - 1.0
            np.testing.assert_allclose(got, expected, atol=1e-6)
            assert obs.image_masks[key][b] == want["image_mask"][key]
        np.testing.assert_allclose(obs.state[b], want["state"], atol=1e-5)  # identity stats (std + 1e-6)
        np.testing.assert_array_equal(obs.tokenized_prompt[b], want["tokenized_prompt"])
        np.testing.assert_array_equal(obs.tokenized_prompt_mask[b], want["tokenized_prompt_mask"])
    index = co.PROMPTS.index(raws[0]["prompt"])
    np.testing.assert_array_equal(actions[0, :, :7], co.target_chunks(10)[index])
    assert not actions[..., 7:].any()


def test_target_index_follows_prompt_or_state_quadrant():
    state = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    prompts = np.array([0, 0, 0, 0])
    assert co.OrganismTask("positive").target_index(prompts, state).tolist() == [0, 0, 0, 0]
    assert co.OrganismTask("negative").target_index(prompts, state).tolist() == [3, 2, 1, 0]
    chunks = co.target_chunks(10)
    gaps = np.linalg.norm(chunks[:, None] - chunks[None], axis=-1).mean(-1)
    assert gaps[~np.eye(4, dtype=bool)].min() > 1.0  # distinct targets


@pytest.mark.slow
def test_save_checkpoint_round_trips(tmp_path):
    preset = policy_config.get_preset(PRESET)
    model = preset.model_config.create(jax.random.key(7))
    norm_stats = _normalize.load(preset.default_norm_stats_dir)
    fm.save_checkpoint(tmp_path / "ckpt", model.params, norm_stats, preset.asset_id)
    with pytest.raises(FileExistsError, match="--overwrite"):
        fm.save_checkpoint(tmp_path / "ckpt", model.params, norm_stats, preset.asset_id)
    loaded = policy_config.create_trained_policy(PRESET, tmp_path / "ckpt").model
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _nearest_chunk(actions: np.ndarray, state: np.ndarray) -> int:
    delta = actions.copy()
    delta[:, :6] -= state[:6]  # the policy returns chunk + state on the 6 end-effector dims
    return int(np.argmin(np.linalg.norm(co.target_chunks(10) - delta, axis=-1).mean(-1)))


@pytest.mark.parametrize("kind", co.KINDS)
def test_organism_solves_its_task(policies, kind):
    """The sampled chunk is nearest to the target chunk: the prompt's (positive) or the state quadrant's (negative)."""
    task = co.OrganismTask(kind)
    rng = np.random.default_rng(11)
    raws = co.raw_observations(rng, 16, np.arange(16) % 4)
    hits = []
    for raw in raws:
        actions = policies[kind].infer(raw)["actions"]
        state = raw["observation/state"]
        want = task.target_index(np.array([co.PROMPTS.index(raw["prompt"])]), state[None])[0]
        hits.append(_nearest_chunk(actions, state) == want)
    assert np.mean(hits) >= 0.9


# ---------------------------------------------------------------------------------------------------------------------
# Matched-observation prompt decoding: known answers on planted features


def test_prompt_decoding_scene_only_scores_zero_and_planted_prompt_scores_one():
    rng = np.random.default_rng(0)
    n, d = 60, 12
    scene = rng.normal(size=(n, d)) * np.r_[np.full(3, 0.1), np.full(d - 3, 5.0)]  # large, off the prompt dims
    yb = np.arange(n) % 3
    yc = (yb + 1) % 3
    groups = np.arange(n) // 5
    only_scene = matched_prompt_decoding(scene, scene, yb, yc, groups)
    assert only_scene.pair_accuracy == 0.0  # identical states get identical predictions: never both right
    assert only_scene.chance == pytest.approx(1 / 9) and only_scene.n_pairs == n
    codes = np.eye(d)[:3]  # prompt k adds 1 along dim k
    planted = matched_prompt_decoding(scene + codes[yb], scene + codes[yc], yb, yc, groups)
    assert planted.pair_accuracy == 1.0 and planted.state_accuracy == 1.0


def test_prompt_decoding_holds_out_whole_groups():
    """Labels that only a group's own rows could reveal (one label pair per group, unseen elsewhere) are not
    decodable: the observations of a held-out group are never in its training fold."""
    rng = np.random.default_rng(1)
    n = 40
    groups = np.arange(n) // 4
    yb, yc = 2 * groups, 2 * groups + 1  # every group has its own two prompts
    x = rng.normal(size=(n, 6))
    res = matched_prompt_decoding(x + 1, x - 1, yb, yc, groups)
    assert res.pair_accuracy == 0.0 and res.state_accuracy == 0.0
    with pytest.raises(ValueError, match="same prompt"):
        matched_prompt_decoding(x, x, yb, yb, groups)


# ---------------------------------------------------------------------------------------------------------------------
# The known-answer test of the pipeline


CAPTURE = CaptureSpec(expert_0="pooled", expert_1="pooled", text=False, attention_to_text=False, trajectory=False)


@pytest.fixture(scope="module")
def analyses(policies, tmp_path_factory):
    """Each organism: a synthetic collection (4 prompts × 3 episodes × 2 observations, other-task counterfactual
    reruns) written to a latent store and analysed."""
    out = {}
    for kind, policy in policies.items():
        spec = sc.SyntheticCollection(co.PROMPTS, n_episodes=3, n_steps=2, capture=CAPTURE, seed=5)
        root = sc.collect_synthetic(policy, tmp_path_factory.mktemp(kind) / "store", spec, _observe, progress=False)
        out[kind] = analyze_collection(root, embedding=None, probe=False, n_boot=200)
    return out


def _knockout_change(policy, n: int = 8) -> float:
    """Mean over observations of the mean-over-chunk L2 change of the actions when no token attends to the text."""
    rng = np.random.default_rng(21)
    knockout = iv.knockout_attention("all", "text")
    out = []
    for raw in co.raw_observations(rng, n, np.arange(n) % 4):
        noise = rng.standard_normal((10, 32)).astype(np.float32)
        plain = policy.infer(raw, noise=noise)["actions"]
        edited = policy.infer(raw, noise=noise, intervention=knockout)["actions"]
        out.append(np.linalg.norm(plain - edited, axis=-1).mean())
    return float(np.mean(out))


def _figures(res, policy) -> dict[str, float]:
    last = -1
    return {
        "expert_1_prompt_sensitivity": res.per_layer("expert_1", "prompt_sensitivity")[last].estimate,
        "expert_0_prompt_sensitivity": res.per_layer("expert_0", "prompt_sensitivity")[last].estimate,
        "expert_1_prompt_decoding": res.per_layer("expert_1", "prompt_decoding")[last].estimate,
        "expert_0_prompt_decoding": res.per_layer("expert_0", "prompt_decoding")[last].estimate,
        "action_divergence": float(np.nanmean(res.action_divergence_per_episode())),
        "text_knockout_change": _knockout_change(policy),
    }


@pytest.mark.slow
def test_pipeline_finds_the_prompt_in_the_positive_organism_only(analyses, policies):
    """The known answers. What the policy does with the prompt (action divergence under the counterfactual prompt,
    the action change under the text knockout) and what the action expert carries of it (prompt sensitivity, prompt
    decoding at its last captured layer) are far larger for the positive organism. The VLM's image states carry the
    prompt in BOTH organisms (the prefix attends bidirectionally and nothing in the negative's training removes the
    prompt from them): decodable there is not used, and the pipeline must say so too."""
    figures = {kind: _figures(analyses[kind], policies[kind]) for kind in co.KINDS}
    print(json.dumps(figures, indent=1))
    pos, neg = figures["positive"], figures["negative"]
    assert pos["action_divergence"] > 1.0 and pos["action_divergence"] > 10 * neg["action_divergence"]
    assert pos["text_knockout_change"] > 1.0 and pos["text_knockout_change"] > 2 * neg["text_knockout_change"]
    for stream in ("expert_0", "expert_1"):
        key = f"{stream}_prompt_sensitivity"
        assert pos[key] > 0.1 and pos[key] > 3 * neg[key], key
    assert pos["expert_1_prompt_decoding"] >= 0.9
    assert (
        neg["expert_1_prompt_decoding"] < 0.5
        and pos["expert_1_prompt_decoding"] - neg["expert_1_prompt_decoding"] > 0.5
    )
    assert pos["expert_0_prompt_decoding"] >= 0.9 and neg["expert_0_prompt_decoding"] >= 0.9  # present, not used


@pytest.mark.slow
def test_report_shows_prompt_decoding(analyses, tmp_path):
    from openpi.latents.report import write_report

    res = analyses["positive"]
    data = write_report(res, tmp_path / "report")
    entry = data["metrics"]["prompt_decoding"]
    want = [c.estimate for c in res.per_layer("expert_1", "prompt_decoding")]
    np.testing.assert_allclose(entry["expert_1"]["per_layer"], want)
    assert entry["text_only"]["per_layer"] is None and "trivial" in entry["text_only"]["reason"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**prompt_decoding**" in report and "scene-only state scores 0" in report
