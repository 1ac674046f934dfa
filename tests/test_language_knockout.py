"""Language knockouts on the positive control organism (tests/data/organisms/positive: a tiny pi0 trained so that
the target action chunk is chosen by the prompt, 4 prompts).

Known answers: with language removed entirely (`knockout_language`) the actions do not depend on the prompt, so
every observation gives the same actions under all 4 prompts (0.0 difference, different prompt lengths included) and
prompt following — the share of (observation, prompt) pairs whose nearest target chunk is that prompt's — is exactly
chance, 1/4: the nearest chunk is one of the 4 targets, the same for all 4 prompts, so exactly one prompt matches.
The two partial knockouts are measured for what they leave: the direct-path knockout (action expert -> text keys)
still follows the prompt well above chance (language reaches the actions through the image tokens), and the
text-keys knockout leaves the prompt's length in the positions (different-length prompts move the actions).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from openpi.latents.collect import conditions
from openpi.models import intervention as iv
from openpi.policies import policy_config
from openpi.training import control_organisms as co

POSITIVE = pathlib.Path(__file__).parent / "data" / "organisms" / "positive"
N_OBS = 32


@pytest.fixture(scope="module")
def policy():
    return policy_config.create_trained_policy("pi0_organism_tiny", POSITIVE)


def _nearest_chunk(actions: np.ndarray, state: np.ndarray) -> int:
    delta = actions.copy()
    delta[:, :6] -= state[:6]  # the policy returns chunk + state on the 6 end-effector dims
    return int(np.argmin(np.linalg.norm(co.target_chunks(10) - delta, axis=-1).mean(-1)))


@pytest.fixture(scope="module")
def runs(policy):
    """Per recipe: actions [N_OBS, 4 prompts, H, 7] for the same observations and noise under each prompt."""
    rng = np.random.default_rng(31)
    raws = co.raw_observations(rng, N_OBS)
    noises = rng.standard_normal((N_OBS, 10, 32)).astype(np.float32)
    recipes = {name: conditions.recipe(name, None) for name in ("knockout-language", "knockout-text-direct")}
    out = {}
    for name, intervention in {"plain": None, **recipes}.items():
        extra = {} if intervention is None else {"intervention": intervention}
        out[name] = np.stack(
            [
                [policy.infer({**raw, "prompt": p}, noise=noise, **extra)["actions"] for p in co.PROMPTS]
                for raw, noise in zip(raws, noises, strict=True)
            ]
        )
    return raws, out


def _following(raws, actions) -> float:
    """Share of (observation, prompt) pairs whose nearest target chunk is the prompt's (the positive organism's
    target is the prompt's chunk)."""
    hits = [
        _nearest_chunk(actions[i, k], raw["observation/state"]) == k
        for i, raw in enumerate(raws)
        for k in range(len(co.PROMPTS))
    ]
    return float(np.mean(hits))


def test_full_knockout_brings_prompt_following_to_chance(runs):
    raws, actions = runs
    rates = {name: _following(raws, a) for name, a in actions.items()}
    print("prompt following (32 observations x 4 prompts):", rates)
    assert rates["plain"] >= 0.9  # the organism follows its prompt
    # Chance is 1/4 exactly here (one nearest chunk per observation, shared by the 4 prompts); tolerance 0.
    assert rates["knockout-language"] == 0.25
    # What the direct-path knockout leaves: the indirect path through the image tokens keeps following above chance
    # (measured 0.35, 95% interval 0.32-0.39 over 64 observations, bootstrap over observations).
    assert rates["knockout-text-direct"] >= 0.3


def test_full_knockout_actions_do_not_depend_on_the_prompt(runs):
    _, actions = runs
    lengths = {len(p.split()) for p in co.PROMPTS}
    assert len(lengths) > 1  # the prompts differ in length
    full = actions["knockout-language"]
    spread = float(np.abs(full - full[:, :1]).max())
    print("knockout-language: max |actions(prompt k) - actions(prompt 0)| =", spread)
    assert spread == 0.0
    assert float(np.abs(actions["plain"] - actions["plain"][:, :1]).max()) > 0.5  # the prompt matters without it


def test_text_keys_knockout_leaves_the_prompt_length_in_the_positions(policy):
    """Same words, one extra word: the text-keys knockout hides the text keys but not the length, the full
    knockout hides both."""
    rng = np.random.default_rng(5)
    raw = co.raw_observations(rng, 1)[0]
    noise = rng.standard_normal((10, 32)).astype(np.float32)
    short, long = "open the drawer", "open the top drawer"
    result = {}
    for name in ("knockout-text-keys", "knockout-language"):
        knock = conditions.recipe(name, None)
        a, b = (policy.infer({**raw, "prompt": p}, noise=noise, intervention=knock)["actions"] for p in (short, long))
        result[name] = float(np.abs(a - b).max())
    print("different-length prompts, max |action change|:", result)
    assert result["knockout-language"] == 0.0
    assert result["knockout-text-keys"] > 1e-4


def test_recipes_and_aliases():
    assert conditions.RECIPE_ALIASES == {
        "knockout-text": "knockout-text-keys",
        "knockout-text-expert1": "knockout-text-direct",
    }
    for old, new in conditions.RECIPE_ALIASES.items():
        assert iv.describe(conditions.recipe(old, (1,))) == iv.describe(conditions.recipe(new, (1,)))
        assert old in conditions.RECIPES and new in conditions.RECIPES
    assert iv.describe(conditions.recipe("knockout-language", None)) == {"ops": [{"op": "knockout_language"}]}
    with pytest.raises(ValueError, match=r"every layer.*drop --condition.layers"):
        conditions.recipe("knockout-language", (2,))


def test_knockout_language_is_a_condition_by_name():
    config = policy_config.get_preset("pi0_organism_tiny").model_config
    cond = conditions.resolve(
        conditions.ConditionArgs(intervention="knockout-language"), config, num_steps=10, list_tasks=lambda s: ()
    )
    assert cond.name == "knockout-language" and cond.details["recipe"] == "knockout-language"
    assert cond.details["intervention"]["ops"] == [{"op": "knockout_language"}]
    old = conditions.resolve(
        conditions.ConditionArgs(intervention="knockout-text-expert1", layers=(1,)), config, num_steps=10,
        list_tasks=lambda s: (),
    )  # fmt: skip
    assert old.name == "knockout-text-expert1@L1"  # an alias keeps its name: older stores and commands read the same
    assert old.details["intervention"]["ops"][0] == {
        "op": "knockout", "queries": "suffix", "keys": "text", "layers": [1], "heads": None,
    }  # fmt: skip
    sweep = conditions.expand(conditions.ConditionArgs(intervention="knockout-language", sweep_layers=True), depth=4)
    with pytest.raises(ValueError, match=r"every layer.*drop --condition.layers"):
        conditions.resolve(sweep[0], config, num_steps=10, list_tasks=lambda s: ())
