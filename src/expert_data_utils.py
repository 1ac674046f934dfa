"""Notebook access to collected pi0 latents: `import expert_data_utils` (installed with the project).

    task_data = expert_data_utils.load_inference_task_data("data/pi0_libero_goal", task_id=0)
    step = task_data["episodes"]["episode_0"]["rollout_steps"]["step_15"]
    step["text_only_hidden_states"]            # read from disk on access, one step only
    task_data["episodes"]["episode_0"]["metadata"]["success"]
"""

from openpi.latents.store import export_pickle, load_inference_task_data, open_store

__all__ = ["export_pickle", "load_inference_task_data", "open_store"]
