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


class BatchedEngine:
    """Requests waiting at the same time share one jitted call (`openpi.policies.batching.BatchingPolicy`).

    Each request's input transforms run first on the caller's thread, so an observation the transforms reject fails
    alone and never enters (and fails) a batch with other clients' requests. A batch of one equals `SerialEngine`
    bit for bit; larger batches differ in float rounding (tests/test_batching.py measures it).
    """

    def __init__(self, policy: Policy, capture: CaptureSpec, *, max_batch: int, max_wait_s: float):
        from openpi.policies.batching import BatchingPolicy

        self._policy, self._capture = policy, capture
        self._front = BatchingPolicy(policy, max_batch=max_batch, max_wait_s=max_wait_s)

    def infer(self, obs: Mapping[str, Any], noise: np.ndarray) -> dict[str, Any]:
        self._policy.prepare(obs)  # raises here, for this request only
        return self._front.infer(obs, noise=noise, capture=self._capture)

    def close(self) -> None:
        self._front.close()


def make_engine(
    policy: Policy, capture: CaptureSpec, intervention: Any, *, max_batch: int, max_wait_s: float
) -> Engine:
    """`BatchedEngine` unless `max_batch` is 1 or an intervention is applied (interventions are not batched)."""
    if max_batch == 1 or intervention is not None:
        return SerialEngine(policy, capture, intervention)
    return BatchedEngine(policy, capture, max_batch=max_batch, max_wait_s=max_wait_s)
