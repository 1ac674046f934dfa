"""Notebook access to collected pi0 latents and their language-loss analysis: ``import expert_data_utils``.

Loading (lazy: nothing is read until an array is indexed, and then one step or one layer only)::

    import expert_data_utils as edu
    edu.list_tasks("data/pi0_libero_goal")                    # [{"task_id", "task_name", "language", "n_episodes"}]
    task_data = edu.load_inference_task_data("data/pi0_libero_goal", task_id=0)
    edu.list_episodes(task_data)                              # ["episode_0", ...]
    edu.rollout_steps(task_data, 0)                           # env timesteps t of the step_{t} keys
    task_data["episodes"]["episode_0"]["rollout_steps"]["step_15"]["text_only_hidden_states"]   # one step
    task_data["episodes"]["episode_0"]["metadata"]["success"]

One layer (``expert_type``: "text_only", "expert_0", "expert_1", or a stored key such as "attention_to_text")::

    edu.get_hidden_states_for_dimensions(task_data, 0, 15, 3, "expert_1")  # step_15, layer 3: [S, B, tokens, W]
    edu.get_layer_across_steps(task_data, 0, 3, "text_only")               # layer 3 over all steps: [steps, B, T, W]

Language loss (definitions in ``openpi.latents.analysis.run.language_loss`` /
``openpi.latents.analysis.metrics.registry``)::

    edu.analyze_language_loss_across_rollout_steps(task_data)   # per episode: [steps, layers] per stream slot
    edu.analyze_inference_language_loss(task_data)              # per layer, mean over episodes; overall_loss
    edu.analyze_rollout_step(task_data["episodes"]["episode_0"]["rollout_steps"]["step_15"])
    res = edu.analyze_collection("data/pi0_libero_goal"); edu.write_report(res, "reports/goal")

Pickles (the original format) execute code when loaded: pass ``allow_pickle=True`` only for files you trust, and pass
``embedding=edu.read_checkpoint_leaves(checkpoint)`` to the analysis (pickles carry no run manifest).
"""

from __future__ import annotations

from openpi.latents.analysis import CollectionAnalysis, analyze_collection
from openpi.latents.analysis.data.accessors import (
    get_hidden_states_for_dimensions,
    get_layer_across_steps,
    rollout_steps,
)
from openpi.latents.analysis.data.embedding import (
    TokenEmbedding,
    read_checkpoint_leaves,
    token_embedding_for_manifest,
    token_embedding_from_model_config,
)
from openpi.latents.analysis.run.language_loss import (
    analyze_inference_language_loss,
    analyze_language_loss_across_rollout_steps,
    analyze_rollout_step,
)
from openpi.latents.report import write_report
from openpi.latents.store import export_pickle, load_inference_task_data, materialize, open_store

__all__ = [
    "CollectionAnalysis",
    "TokenEmbedding",
    "analyze_collection",
    "analyze_inference_language_loss",
    "analyze_language_loss_across_rollout_steps",
    "analyze_rollout_step",
    "export_pickle",
    "get_hidden_states_for_dimensions",
    "get_layer_across_steps",
    "list_episodes",
    "list_tasks",
    "load_inference_task_data",
    "materialize",
    "open_store",
    "read_checkpoint_leaves",
    "rollout_steps",
    "token_embedding_for_manifest",
    "token_embedding_from_model_config",
    "write_report",
]


def list_tasks(path, *, allow_pickle: bool = False) -> list[dict]:
    """Tasks of a collection (store or pickles): task_id, task_name, language, suite and the number of episodes."""
    tasks = load_inference_task_data(path, None, allow_pickle=allow_pickle)
    out = []
    for task_id in sorted(tasks):
        data = tasks[task_id]
        info = {k: data[k] for k in ("task_id", "task_name", "language", "suite") if k in data}
        info["n_episodes"] = len(data["episodes"])
        out.append(info)
    return out


def list_episodes(task_data) -> list[str]:
    """The task's episode keys (``episode_k``), by index."""
    return sorted(task_data["episodes"], key=lambda name: int(name.split("_", 1)[1]))
