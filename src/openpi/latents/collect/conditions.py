"""Closed-loop conditions: what a run changes against the plain policy (its prompt, an intervention, a text latent).

A condition is paired with its baseline (the task's own instruction, no intervention) by (task, initial state, seed):
the episode's noise is drawn from ``default_rng([seed, task_id, k])``
(`openpi.latents.recording.records.episode_noise`), so inference i of a condition's episode k gets exactly the noise
of inference i of the baseline's episode k, whatever the condition.

* Prompt modes (`--condition.prompt`): ``task`` (the task's instruction, default), ``blank`` (""), ``other-task``
  (the instruction of task ``(id + other_task_offset) mod n`` of the suite: task A's scene, task B's words) and
  ``text`` (`--condition.prompt-text`).
* Interventions (`--condition.intervention`): a named recipe (`RECIPES`) at `--condition.layers` (default: every
  layer), or the path of a JSON file (`openpi.models.intervention_file`).
* Layer sweeps (`--condition.sweep-layers`): one condition per layer, ``<recipe>@L<l>``, each into its own store.
* Text latents (`--condition.text-latent latents.npz --condition.text-latent-task K`): task K's text latent
  (`openpi.latents.text_latent`) written into the text window, optionally blended with a second task's.

`expand` turns the arguments into one `CollectionArgs` per condition: a single condition writes its store at
`--output-dir` (the layout of a plain run); several (a sweep, or `--condition.baseline`) write one store per
condition at ``<output-dir>/<condition name>/``. Each manifest holds the condition (``condition``) and so does every
episode's metadata.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from openpi.envs import base as env_base
from openpi.latents.recording.args import check_intervention
from openpi.models import intervention as iv
from openpi.models import intervention_file

if TYPE_CHECKING:
    from openpi.models.pi0_config import Pi0Config

PromptMode = Literal["task", "blank", "other-task", "text"]
# Named interventions, at `layers` (None = all). The knockouts are named by the path they cut; the old names stay as
# aliases (`RECIPE_ALIASES`) so older commands and stores read the same.
RECIPES: dict[str, str] = {
    "knockout-language": "language removed entirely: no query of either expert reads the text keys, and positions "
    "are counted as if the prompt were absent (no --condition.layers: every layer)",
    "knockout-text-keys": "every query's attention onto the text keys removed (masked before the softmax); the "
    "prompt's length still sets the positions of every later token",
    "knockout-text-direct": "the direct path cut: the action expert's (expert-1) attention onto the text keys "
    "removed; language still reaches it through the image tokens, which read the text in expert 0",
    "ablate-text": "expert 0's residual stream at the text tokens set to zero entering each listed layer",
    "steer": "alpha * vector (--condition.steer-vector, [W] or [L', W]) added to expert 0's text tokens",
}
RECIPE_ALIASES: dict[str, str] = {
    "knockout-text": "knockout-text-keys",
    "knockout-text-expert1": "knockout-text-direct",
}
RECIPES |= {old: f"alias of {new}: {RECIPES[new]}" for old, new in RECIPE_ALIASES.items()}
BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class ConditionArgs:
    """What a closed-loop run changes against the plain policy (default: nothing, the baseline)."""

    # Prompt: "task" (the task's instruction), "blank" (""), "other-task" (another task's instruction of the suite,
    # see other-task-offset) or "text" (--condition.prompt-text).
    prompt: PromptMode = "task"
    # The prompt of --condition.prompt text.
    prompt_text: str | None = None
    # --condition.prompt other-task uses the instruction of task (id + offset) mod (tasks in the suite).
    other_task_offset: int = 1
    # An intervention: "none", a recipe (knockout-language, knockout-text-keys, knockout-text-direct, ablate-text,
    # steer; aliases knockout-text = knockout-text-keys, knockout-text-expert1 = knockout-text-direct) or a JSON file.
    intervention: str = "none"
    # Layers of the recipe (default: every layer).
    layers: tuple[int, ...] | None = None
    # The steer recipe's vector: a .npy file of shape [W] (every layer) or [L', W] (one row per listed layer).
    steer_vector: pathlib.Path | None = None
    # The steer recipe's scale.
    alpha: float = 1.0
    # Run the recipe once per layer (of --condition.layers, default all): conditions <recipe>@L0, @L1, ...
    sweep_layers: bool = False
    # Also run the baseline (task prompt, no intervention) first; with several conditions each gets its own store.
    baseline: bool = False
    # Text latents (.npz from scripts/build_text_latents.py) to inject into the text window.
    text_latent: pathlib.Path | None = None
    # The task whose text latent is injected.
    text_latent_task: int | None = None
    # Blend toward this task's latent: latent = (1 - a) * latent[task] + a * latent[blend task].
    text_latent_blend_task: int | None = None
    # The blend weight a; with schedule "linear" the weight reached at --condition.text-latent-ramp inferences.
    text_latent_alpha: float = 0.5
    # "fixed": weight a at every inference; "linear": a * min(1, i / ramp) at inference i (the paper's temporal
    # interpolation from the first task's latent to the second's).
    text_latent_schedule: Literal["fixed", "linear"] = "fixed"
    # Inferences over which the linear schedule ramps up.
    text_latent_ramp: int = 10
    # "steer": add the latent (per layer, mean over its valid tokens) to every text token, scaled by
    # --condition.text-latent-scale; "patch": replace the first n text tokens by the latent's n valid tokens.
    text_latent_mode: Literal["steer", "patch"] = "steer"
    # Scale of the steer injection.
    text_latent_scale: float = 1.0
    # Name of the condition (default: made from the settings, e.g. "blank", "knockout-text@L3").
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Condition:
    """A resolved condition: the prompt of each task and the intervention of each inference."""

    name: str
    prompt_mode: PromptMode
    prompt_of: Callable[[env_base.TaskInfo], str]
    intervention_at: Callable[[int], iv.Intervention | None]  # inference index -> intervention (None: none)
    details: dict[str, Any]  # JSON: what the manifest and each episode record about the condition

    @property
    def is_baseline(self) -> bool:
        return self.prompt_mode == "task" and self.details.get("intervention") is None

    def describe(self, task: env_base.TaskInfo | None = None) -> dict[str, Any]:
        out = {"name": self.name, "prompt_mode": self.prompt_mode, **self.details}
        if task is not None:
            out["prompt"] = self.prompt_of(task)
        return out


def condition_name(c: ConditionArgs) -> str:
    """A file-name-safe name for the condition."""
    if c.name:
        return c.name
    parts = []
    if c.prompt == "other-task":
        parts.append(f"other-task{c.other_task_offset:+d}")
    elif c.prompt != "task":
        parts.append(c.prompt)
    if c.intervention != "none":
        base = c.intervention if c.intervention in RECIPES else pathlib.Path(c.intervention).stem
        layers = "" if c.layers is None else "@L" + ",".join(str(x) for x in c.layers)
        parts.append(base + layers)
    if c.text_latent is not None:
        tl = f"text-latent-T{c.text_latent_task}"
        if c.text_latent_blend_task is not None:
            tl += f"-T{c.text_latent_blend_task}-{c.text_latent_schedule}{c.text_latent_alpha:g}"
        parts.append(tl)
    return "+".join(parts) or BASELINE


def expand(c: ConditionArgs, depth: int) -> list[ConditionArgs]:
    """The conditions `c` stands for: the baseline first when asked, then one per layer for a sweep, else `c`."""
    out = [ConditionArgs()] if c.baseline else []
    plain = dataclasses.replace(c, baseline=False, sweep_layers=False)
    if not c.sweep_layers:
        return [*out, plain]
    if c.intervention == "none":
        raise ValueError("--condition.sweep-layers needs --condition.intervention (a recipe) to sweep over layers.")
    if c.name is not None:
        raise ValueError("--condition.name names one condition; a sweep names each '<recipe>@L<layer>' itself.")
    layers = range(depth) if c.layers is None else c.layers
    return out + [dataclasses.replace(plain, layers=(int(layer),)) for layer in layers]


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_function(c: ConditionArgs, list_tasks: Callable[[str], tuple[env_base.TaskInfo, ...]]):
    """task -> prompt for the condition's prompt mode (validated here)."""
    if c.prompt == "text":
        if c.prompt_text is None:
            raise ValueError("--condition.prompt text needs --condition.prompt-text 'the prompt'.")
        text = c.prompt_text
        return lambda task: text
    if c.prompt_text is not None:
        raise ValueError("--condition.prompt-text is only used with --condition.prompt text.")
    if c.prompt == "blank":
        return lambda task: ""
    if c.prompt == "task":
        return lambda task: task.language
    if c.prompt != "other-task":
        raise ValueError(f"--condition.prompt {c.prompt!r}: use task, blank, other-task or text.")

    def other(task: env_base.TaskInfo) -> str:
        tasks = list_tasks(task.suite)
        if len(tasks) < 2 or c.other_task_offset % len(tasks) == 0:
            raise ValueError(
                f"--condition.prompt other-task: offset {c.other_task_offset} maps {task.suite} task {task.task_id} "
                f"onto itself ({len(tasks)} tasks); use an offset that is not a multiple of {len(tasks)}."
            )
        return tasks[(task.task_id + c.other_task_offset) % len(tasks)].language

    return other


# ---------------------------------------------------------------------------------------------------------------------
# Interventions


def recipe(name: str, layers: tuple[int, ...] | None, *, vector: Any = None, alpha: float = 1.0) -> iv.Intervention:
    """The named intervention (`RECIPES`) at `layers` (None: every layer)."""
    name = RECIPE_ALIASES.get(name, name)
    if name == "knockout-language":
        if layers is not None:
            raise ValueError(
                "The knockout-language recipe removes language at every layer (its positions are global): drop "
                "--condition.layers, or use knockout-text-keys / knockout-text-direct for a per-layer knockout."
            )
        return iv.knockout_language()
    if name == "knockout-text-keys":
        return iv.knockout_attention("all", "text", layers=layers)
    if name == "knockout-text-direct":
        return iv.knockout_attention("suffix", "text", layers=layers)
    if name == "ablate-text":
        return iv.ablate(0, "text", layers, mode="zero")
    if name == "steer":
        if vector is None:
            raise ValueError("The steer recipe needs --condition.steer-vector vector.npy ([W] or [L', W]).")
        return iv.steer(0, "text", layers, vector, alpha=alpha)
    raise ValueError(f"Unknown intervention recipe {name!r}: use one of {', '.join(RECIPES)} or a JSON file path.")


def _fixed_intervention(c: ConditionArgs) -> iv.Intervention | None:
    if c.intervention == "none":
        return None
    if c.intervention in RECIPES:
        vector = None
        if c.steer_vector is not None:
            vector = np.load(c.steer_vector, allow_pickle=False).astype(np.float32)
        return recipe(c.intervention, c.layers, vector=vector, alpha=c.alpha)
    if c.intervention.endswith(".json") or pathlib.Path(c.intervention).exists():
        if not pathlib.Path(c.intervention).is_file():
            raise FileNotFoundError(
                f"--condition.intervention {c.intervention}: no such file; pass a recipe ({', '.join(RECIPES)}) or a "
                "JSON file."
            )
        return intervention_file.load_intervention(c.intervention, flag="--condition.intervention")
    raise ValueError(
        f"--condition.intervention {c.intervention!r} is neither a recipe ({', '.join(RECIPES)}) nor a JSON file."
    )


def resolve(
    c: ConditionArgs,
    config: Pi0Config,
    *,
    num_steps: int,
    list_tasks: Callable[[str], tuple[env_base.TaskInfo, ...]],
) -> Condition:
    """Validates one condition against the model (before anything expensive) and resolves it."""
    if c.sweep_layers or c.baseline:
        raise ValueError("resolve takes one condition; expand --condition.sweep-layers / --condition.baseline first.")
    prompt_of = prompt_function(c, list_tasks)
    fixed = _fixed_intervention(c)
    latent_at = None
    details: dict[str, Any] = {"layers": None if c.layers is None else list(c.layers)}
    if c.text_latent is not None:
        from openpi.latents import text_latent

        latent_at, details["text_latent"] = text_latent.injection(c, config)
    elif c.text_latent_task is not None or c.text_latent_blend_task is not None:
        raise ValueError("--condition.text-latent-task needs --condition.text-latent latents.npz.")

    def intervention_at(i: int) -> iv.Intervention | None:
        parts = [p for p in (fixed, None if latent_at is None else latent_at(i)) if p is not None]
        return iv.combine(*parts) if parts else None

    for i in (0, 1):  # a schedule may change values, never the structure: checking two inferences suffices
        edit = intervention_at(i)
        if edit is not None:
            check_intervention(edit, config, num_steps=num_steps)
    first = intervention_at(0)
    details["intervention"] = None if first is None else {"spec": c.intervention, **iv.describe(first)}
    if c.intervention in RECIPES:
        details["recipe"] = c.intervention
    if c.prompt == "other-task":
        details["other_task_offset"] = c.other_task_offset
    return Condition(condition_name(c), c.prompt, prompt_of, intervention_at, details)
