"""One stored episode as the analysis sees it: :class:`EpisodeRef` (what the driver, the metrics and the result
share)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    task_id: int
    episode: int
    success: bool
    n_steps: int
    step_t: tuple[int, ...]
    prompt: str | None
    counterfactual_prompt: str | None
    error: str | None
