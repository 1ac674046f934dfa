"""How the server runs the policy: one request at a time behind a lock (exact), or batched across connections."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from openpi.models.capture import CaptureSpec
from openpi.policies.policy import Policy


class Engine(Protocol):
    def infer(self, obs: Mapping[str, Any], noise: np.ndarray) -> dict[str, Any]:
        """`Policy.infer_with_latents` of one observation with this noise; safe to call from many threads."""
        ...

    def close(self) -> None: ...


class SerialEngine:
    """One inference at a time (a lock): each request is its own B = 1 jitted call."""

    def __init__(self, policy: Policy, capture: CaptureSpec, intervention: Any = None):
        self._policy, self._capture, self._intervention = policy, capture, intervention
        self._lock = threading.Lock()

    def infer(self, obs: Mapping[str, Any], noise: np.ndarray) -> dict[str, Any]:
        with self._lock:
            return self._policy.infer_with_latents(
                obs, noise=noise, capture=self._capture, intervention=self._intervention
            )

    def close(self) -> None:
        pass
