"""Causal maps (activation patching) on the control organisms: the known answers (issue 21 deliverable 6).

The organisms (tests/data/organisms, float32 tiny pi0s) are trained so that the target chunk is the prompt's
(positive) or the state's (negative). Exactness: patching every site at once gives the clean action bit for bit, and
patching nothing gives the corrupted run's action bit for bit (the hook is an exact identity at weight 0).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi.latents.causal import pairs
from openpi.models import intervention as iv
from openpi.models import patch_map, patching
from openpi.policies import policy_config
from openpi.training import control_organisms as co

ORGANISMS = pathlib.Path(__file__).parent / "data" / "organisms"
CHUNK = 16


@pytest.fixture(scope="module")
def policies():
    return {kind: policy_config.create_trained_policy("pi0_organism_tiny", ORGANISMS / kind) for kind in co.KINDS}


def _pair(policy, seed: int, prompt_index: int = 0, corrupt: str = "other-task") -> pairs.Pair:
    rng = np.random.default_rng(seed)
    raw = co.raw_observations(rng, 1, np.array([prompt_index]))[0]
    cfg = policy.model.config
    noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    return pairs.make_pair(policy, raw, pairs.corrupted_prompt(raw["prompt"], corrupt, co.PROMPTS), noise)


def _map(policy, pair, **kw) -> patch_map.PairMap:
    return patch_map.pair_map(policy.model, pair.clean, pair.corrupt, jnp.asarray(pair.noise), chunk=CHUNK, **kw)


@pytest.fixture(scope="module")
def positive_map(policies):
    return _map(policies["positive"], _pair(policies["positive"], 0), attribution=True)


def test_fit_prompt_keeps_bos_and_newline_on_the_clean_layout():
    ids = np.array([2, 7, 8, 9, 4, 0, 0])
    mask = ids != 0
    got, m = patch_map.fit_prompt(ids, mask, 3)  # truncated content
    assert got.tolist() == [2, 7, 4, 0, 0, 0, 0] and m.tolist() == [True] * 3 + [False] * 4
    got, m = patch_map.fit_prompt(np.array([2, 4, 0, 0, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 0, 0], bool), 5)
    assert got.tolist() == [2, 0, 0, 0, 4, 0, 0] and m.sum() == 5  # blank: filler between BOS and "\n"


def test_pairs_of_different_layouts_are_refused(policies):
    policy = policies["positive"]
    rng = np.random.default_rng(0)
    raw = co.raw_observations(rng, 1, np.array([0]))[0]
    _, a = policy.prepare(raw)
    _, b = policy.prepare({**raw, "prompt": co.PROMPTS[1]})  # 11 vs 8 valid tokens, not fitted
    noise = jnp.zeros((1, 10, 32))
    with pytest.raises(ValueError, match="fit_prompt"):
        patch_map.pair_map(policy.model, a, b, noise, chunk=CHUNK)


def test_patching_nothing_and_everything_is_exact(policies):
    """Weight 0 leaves the run exactly (its unpatched record at the same batch), weight 1 everywhere gives the
    source's action exactly (0.0 difference in float32)."""
    policy = policies["positive"]
    pair = _pair(policy, 3)
    model, cfg, noise = policy.model, policy.model.config, jnp.asarray(pair.noise)
    clean = patching.record(model, pair.clean, noise, num_steps=10, rows=CHUNK)
    corrupt = patching.record(model, pair.corrupt, noise, num_steps=10, rows=CHUNK)
    sites = [patch_map.NOTHING, patch_map.EVERYTHING] * (CHUNK // 2)
    g0, g1 = patch_map.prefix_groups(cfg, clean["prefix_mask"]), patch_map.suffix_groups(cfg)
    w = patch_map.site_weights(cfg, sites, g0, g1, 10, patching.POINTS)
    out = patching.patched_actions(
        model, pair.corrupt, noise, {k: jnp.asarray(v) for k, v in w.items()}, clean["sources"], num_steps=10
    )
    plain = model.sample_actions(jax.random.key(0), jax.tree.map(lambda x: jnp.repeat(x, CHUNK, 0), pair.corrupt),
                                 noise=jnp.repeat(noise, CHUNK, 0), num_steps=10)  # fmt: skip
    assert float(jnp.abs(clean["actions"][0] - corrupt["actions"][0]).max()) > 1.0  # there is an effect
    # The model's own sampler is another XLA program (SigLIP at batch N, other fusions): equal up to rounding.
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(plain[0]), atol=1e-5)
    assert float(jnp.abs(out[0] - corrupt["actions"][0]).max()) == 0.0
    assert float(jnp.abs(out[1] - clean["actions"][0]).max()) == 0.0


def test_positive_organism_language_enters_through_the_text(positive_map):
    m = positive_map
    assert m.reason is None and m.effect > 1.0 and m.everything == 1.0
    # The prompt's only entry point is the text embedding: restoring it at layer 0 restores the clean action.
    assert m.maps["0/residual/text_content"][0] > 0.95
    # BOS and "\n" are the same in every prompt, and the state token never sees the text before expert 1 reads it
    # through the same keys as the actions: patching them restores nothing.
    assert abs(m.maps["0/residual/text_bos_newline"][0]) < 1e-6
    for point in ("residual", "attn_out", "mlp_out"):
        assert np.abs(m.maps[f"1/{point}/state"]).max() < 0.02, point
    # Expert 1 reads the prompt mostly straight from the text keys (the direct path).
    assert m.paths["direct"] > 0.5 and m.paths["direct"] > 3 * abs(m.paths["indirect"])
    assert m.maps["1/kv/text_content"].max() > 5 * np.abs(m.maps["1/kv/text_bos_newline"]).max()


def test_attribution_ranks_sites_like_exact_patching(positive_map):
    from scipy.stats import spearmanr

    keys = sorted(positive_map.maps)
    exact = np.concatenate([positive_map.maps[k].ravel() for k in keys])
    approx = np.concatenate([positive_map.attribution[k].ravel() for k in keys])
    assert spearmanr(exact, approx).statistic > 0.6


def test_negative_organism_reads_about_zero_at_every_site(policies, positive_map):
    """The negative organism's action barely moves with the prompt (|a_A - a_B| ≈ 0.98 against the positive's 12.6
    on this pair): every site restores under a tenth of the positive's effect in action units (score × |a_A - a_B|;
    the normalised score alone is scale-free, so a tiny effect can still be restored "fully"), or the whole map is
    NaN with its reason when the runs agree."""
    m = _map(policies["negative"], _pair(policies["negative"], 0))
    if m.reason is not None:
        assert "agree" in m.reason and all(np.isnan(v).all() for v in m.maps.values())
        return
    assert m.effect < 0.1 * positive_map.effect
    for key, values in m.maps.items():
        assert np.nanmax(np.abs(values)) * m.effect < 0.1 * positive_map.effect, key


def test_direct_path_knocked_out_leaves_the_whole_effect_on_the_indirect_path(policies):
    """With expert 1 unable to attend to the text, the prompt reaches the action only through the image tokens'
    keys and values: patching those restores all of it, patching the text keys nothing."""
    policy = policies["positive"]
    knock = iv.knockout_attention("suffix", "text")
    m = _map(policy, _pair(policy, 1), intervention=knock)
    assert m.reason is None and m.effect > 1e-3
    # Masked keys get softmax weight exactly 0; what remains is float32 rounding between rows of one batch (~1e-7).
    assert abs(m.paths["direct"]) < 1e-5 and abs(m.paths["indirect"] - 1.0) < 1e-5
    assert np.abs(m.maps["1/kv/text_content"]).max() < 1e-5


def test_noising_direction_and_bounded_compiles(policies):
    """The reverse direction: corrupting the text embedding alone carries the whole effect. A second full map of
    another pair compiles nothing new (the site batch is fixed; sites are weights, not program structure)."""
    policy = policies["positive"]
    first = _map(policy, _pair(policy, 4, prompt_index=2), direction="noise")
    before = patching.patched_actions._cache_size()
    second = _map(policy, _pair(policy, 5, prompt_index=3, corrupt="blank"), direction="noise")
    assert patching.patched_actions._cache_size() == before
    for m in (first, second):
        assert m.everything == 1.0 and m.maps["0/residual/text_content"][0] > 0.95


# ---------------------------------------------------------------------------------------------------------------------
# Over a stored collection: the CLI, its files and the report section


def _observe(rng: np.random.Generator, prompt: str) -> dict:
    obs = co.raw_observations(rng, 1)[0]
    del obs["prompt"]
    return obs


def _script():
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "scripts" / "causal_map.py"
    spec = importlib.util.spec_from_file_location("causal_map_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_maps_a_stored_collection_and_the_report_shows_them(policies, tmp_path):
    import json

    from openpi.latents import synthetic_collection as sc
    from openpi.latents.causal import runner
    from openpi.latents.causal.report import causal_section
    from openpi.models.capture import CaptureSpec

    capture = CaptureSpec(expert_0="off", expert_1="off", text=False, attention_to_text=False)
    spec = sc.SyntheticCollection(co.PROMPTS[:2], n_episodes=1, n_steps=2, capture=capture, seed=3,
                                  store_images=True, counterfactual="none")  # fmt: skip
    src = sc.collect_synthetic(policies["positive"], tmp_path / "store", spec, _observe, progress=False)
    out = tmp_path / "report" / "causal_map"
    script = _script()
    with pytest.raises(SystemExit, match="2"):
        script.main(runner.CausalMapArgs(collection=str(src), output_dir=str(out), directions=("sideways",)))
    with pytest.raises(SystemExit, match="2"):
        script.main(runner.CausalMapArgs(collection=str(tmp_path / "missing"), output_dir=str(out)))
    assert not out.exists()
    doc = script.main(runner.CausalMapArgs(collection=str(src), output_dir=str(out), max_observations=3, chunk=CHUNK))
    d = doc["directions"]["denoise"]
    saved = json.loads((out / "causal_map.json").read_text())
    assert saved["n_episodes"] == 2 and saved["n_tasks"] == 2 and len(saved["pairs"]) == 3
    assert {(p["clean"], p["corrupt"]) for p in saved["pairs"]} == {co.PROMPTS[:2], co.PROMPTS[1::-1]}
    assert d["everything"] == [1.0] * 3 and len(d["spearman_exact_vs_attribution"]) == 3
    arrays = np.load(out / "causal_map.npz")
    assert arrays["denoise/0/residual/text_content/values"].shape == (3, policies["positive"].model.config.depth)
    assert arrays["denoise/1/kv/text_content/mean"].shape == (10, policies["positive"].model.config.depth)
    assert arrays["denoise/0/residual/text_content/mean"][0] > 0.95
    assert all((out / f).stat().st_size > 1000 for f in doc["figures"])
    section = "\n".join(causal_section(tmp_path / "report"))
    assert "causal_map/causal_map_denoise.png" in section and "direct (text)" in section and "Spearman" in section
    assert causal_section(tmp_path / "nothing") == []


def test_cluster_bootstrap_resamples_episodes_not_steps():
    """Known truth: the mean of the observations (NaN rows left out). The confound: steps of one episode share its
    offset, so the episode bootstrap must be wider than one that treats the steps as independent."""
    from openpi.latents.causal.maps import cluster_bootstrap

    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(10), 20)
    values = rng.normal(size=10)[clusters] + 0.01 * rng.normal(size=200)
    values[3] = np.nan
    mean, low, high = cluster_bootstrap(values[:, None], list(clusters), n_boot=500)
    assert mean[0] == pytest.approx(np.nanmean(values))
    _, nlow, nhigh = cluster_bootstrap(values[:, None], list(range(200)), n_boot=500)
    assert (high - low)[0] > 3 * (nhigh - nlow)[0] and low[0] < mean[0] < high[0]
    single = cluster_bootstrap(values[:5, None], [0] * 5)
    assert np.isnan(single[1]).all()
