"""Batched inference: several waiting observations in ONE jitted model call, results split back per request.

openpi's `Policy` runs one observation per call. Here the per-observation work (input transforms, output transforms)
stays per observation in numpy, exactly as `Policy` does it, and only the model call is batched:

1. each request's observation goes through `Policy.prepare` (batch axis of one) and gets its own noise (given, or
   drawn from the policy's rng);
2. the requests are stacked and padded to the next size of a small fixed set (`DEFAULT_BUCKETS` = 1, 2, 4, 8, ...) by
   repeating the first request, so that jit compiles once per bucket, not once per number of waiting requests;
3. one `Pi0.infer_with_latents` (a `CaptureSpec` given) or `Pi0.sample_actions` (no capture) call runs the batch;
4. actions and latents are split back: each request gets the outputs `Policy.infer_with_latents` / `Policy.infer`
   return for one observation, latents with a batch axis of one (the batch axis of each latent key is found once
   per capture spec with `jax.eval_shape`, so pi0.5's keys and future keys need no table here).

Batching changes float rounding (XLA picks other reduction orders for other shapes): the rows of a batch are not
bit-identical to one-observation calls (tests/test_batching.py measures the difference); a batch of one is.
Interventions are not batched (their values carry a batch axis of their own): use `Policy` for them.

Two fronts:

* `BatchedInference.run(requests, capture)`: synchronous, for a loop that knows which requests wait (the parallel
  collection).
* `BatchingPolicy.submit(obs, noise=, capture=) -> Future`: thread-safe; a background thread gathers requests that
  arrive within `max_wait_s` of the first (up to `max_batch`) and runs them together. From asyncio:
  ``await batching_policy.infer_async(obs)`` (or ``asyncio.wrap_future(submit(...))``).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class Request:
    """One observation to infer: its raw (unbatched) observation and optional [H, AD] noise (None: drawn)."""

    obs: Mapping[str, Any]
    noise: Any = None


def bucket_size(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket holding `n` requests; ValueError when `n` exceeds the largest."""
    if n < 1:
        raise ValueError(f"a batch needs at least one request, got {n}.")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} requests exceed the largest batch bucket {buckets[-1]}; split them first.")
    return buckets[i]


def _concat(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _take(x: np.ndarray, axis: int | None, i: int) -> np.ndarray:
    """Row `i` of `x` along its batch `axis`, keeping the axis (size one); arrays without a batch axis are shared."""
    if axis is None:
        return x
    return np.take(x, [i], axis=axis)


class BatchedInference:
    """Runs lists of requests as padded batches through one policy's model (synchronous; not thread-safe).

    Args:
        policy: the `Policy` whose transforms, model, sampling options and rng are used.
        buckets: the batch sizes jit compiles for (ascending); a list longer than the largest is split.
    """

    def __init__(self, policy: Policy, buckets: Sequence[int] = DEFAULT_BUCKETS):
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending positive sizes, got {buckets}.")
        self.policy = policy
        self.buckets = tuple(buckets)
        self._axes: dict[CaptureSpec, dict[str, int | None]] = {}  # latent key -> batch axis, per capture spec

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def run(self, requests: Sequence[Request], capture: CaptureSpec | None = None) -> list[dict[str, Any]]:
        """One output dict per request, in order: `Policy.infer_with_latents`'s keys with a `capture`, else
        `Policy.infer`'s (plus ``noise`` and ``model_actions``). ``policy_timing`` adds ``batch_size`` and
        ``padded_batch_size``; its ``infer_ms`` is the whole batch's model call."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(requests), self.max_batch):
            out += self._run_batch(requests[start : start + self.max_batch], capture)
        return out

    def _run_batch(self, requests: Sequence[Request], capture: CaptureSpec | None) -> list[dict[str, Any]]:
        policy, n = self.policy, len(requests)
        padded = bucket_size(n, self.buckets)
        inputs = [policy.prepare(r.obs)[0] for r in requests]
        noises = [policy.draw_noise() if r.noise is None else policy.check_noise(r.noise) for r in requests]
        # Padding rows repeat the first request: real data (no NaN paths), and discarded.
        batch = _concat(inputs + [inputs[0]] * (padded - n))
        noise = jnp.asarray(np.stack(noises + [noises[0]] * (padded - n)))
        observation = _model.Observation.from_dict(batch)
        kwargs = policy.sample_kwargs
        rng = policy.next_rng()
        start = time.monotonic()
        if capture is None:
            result = {"actions": policy.model.sample_actions(rng, observation, noise=noise, **kwargs)}
        else:
            result = policy.model.infer_with_latents(rng, observation, noise=noise, capture=capture, **kwargs)
        result = jax.block_until_ready(result)
        elapsed = time.monotonic() - start
        result = {k: np.asarray(v) for k, v in result.items()}
        axes = {} if capture is None else self._batch_axes(observation, noise, capture)
        outputs = []
        for i in range(n):
            model_actions = result["actions"][i : i + 1]
            one = policy.finish_outputs(inputs[i]["state"], model_actions, elapsed)
            one["policy_timing"].update(batch_size=n, padded_batch_size=padded)
            one["noise"] = noises[i]
            one["model_actions"] = model_actions[0]
            if capture is not None:
                one["latents"] = {k: _take(v, axes[k], i) for k, v in result.items() if k != "actions"}
            outputs.append(one)
        return outputs

    def _batch_axes(self, observation: Any, noise: jax.Array, capture: CaptureSpec) -> dict[str, int | None]:
        """The batch axis of each output key (None: shared by the batch, e.g. ``denoise_times``), from the output
        shapes at batch sizes 1 and 2 (`jax.eval_shape`: traced, not run; once per capture spec)."""
        if capture not in self._axes:
            model, kwargs, rng = self.policy.model, self.policy.sample_kwargs, jax.random.key(0)

            def shapes(b: int) -> dict[str, Any]:
                obs_b = jax.tree.map(lambda x: jnp.concatenate([x[:1]] * b, axis=0), observation)
                noise_b = jnp.concatenate([noise[:1]] * b, axis=0)
                return jax.eval_shape(
                    lambda o, z: model.infer_with_latents(rng, o, noise=z, capture=capture, **kwargs), obs_b, noise_b
                )

            one, two = shapes(1), shapes(2)
            axes: dict[str, int | None] = {}
            for key, s1 in one.items():
                differ = [a for a, (d1, d2) in enumerate(zip(s1.shape, two[key].shape, strict=True)) if d1 != d2]
                if len(differ) > 1:  # pragma: no cover - a model output with two batch axes
                    raise ValueError(f"output {key!r} changes along axes {differ} with the batch size.")
                axes[key] = differ[0] if differ else None
            self._axes[capture] = axes
        return self._axes[capture]


@dataclasses.dataclass
class _Pending:
    request: Request
    capture: CaptureSpec | None
    future: concurrent.futures.Future


class BatchingPolicy:
    """A thread-safe front that gathers requests waiting at the same time into batched model calls.

    A background thread takes the first waiting request, then keeps gathering for up to `max_wait_s` (or until
    `max_batch` requests wait), groups them by capture spec (a static argument of the jitted call) and runs each
    group as one `BatchedInference` batch. Each `submit` gets a `concurrent.futures.Future` resolving to the output
    dict of `BatchedInference.run` (or raising the batch's exception). Use as a context manager or call `close()`.

    Args:
        policy: the `Policy` to run (only this front may use it while the front is open: its rng is not locked).
        max_batch: the most requests in one model call (a bucket size).
        max_wait_s: how long the first request of a batch waits for others (0: take only what already waits).
        buckets: padded batch sizes; those above `max_batch` are dropped.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.002,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
    ):
        sizes = tuple(b for b in buckets if b <= max_batch)
        if not sizes or sizes[-1] != max_batch:
            raise ValueError(f"max_batch={max_batch} must be one of the bucket sizes {tuple(buckets)}.")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}.")
        self.inference = BatchedInference(policy, sizes)
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="batching-policy", daemon=True)
        self._thread.start()

    @property
    def policy(self) -> Policy:
        return self.inference.policy

    def submit(
        self, obs: Mapping[str, Any], *, noise: Any = None, capture: CaptureSpec | None = None
    ) -> concurrent.futures.Future:
        """Queues one observation; `capture` None: actions only (`Policy.infer`), else with latents."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("BatchingPolicy is closed.")
            self._queue.put(_Pending(Request(obs, noise), capture, future))
        return future

    async def infer_async(
        self, obs: Mapping[str, Any], *, noise: Any = None, capture: CaptureSpec | None = None
    ) -> dict[str, Any]:
        """`submit` awaited from asyncio (the event loop is not blocked by the model call)."""
        return await asyncio.wrap_future(self.submit(obs, noise=noise, capture=capture))

    def infer(self, obs: Mapping[str, Any], *, noise: Any = None, capture: CaptureSpec | None = None) -> dict:
        """`submit` and wait (from a thread)."""
        return self.submit(obs, noise=noise, capture=capture).result()

    def close(self) -> None:
        """Runs what is queued, then stops the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> BatchingPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- background thread ---------------------------------------------------------------------------
    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """`first` plus what arrives within the wait window; (batch, stop after it)."""
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.inference.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            groups: dict[CaptureSpec | None, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(item.capture, []).append(item)
            for capture, items in groups.items():
                live = [p for p in items if p.future.set_running_or_notify_cancel()]
                if not live:
                    continue
                self._run_group(live, capture)

    def _run_group(self, live: list[_Pending], capture: CaptureSpec | None) -> None:
        """One batch; if it fails, each request alone, so that one bad request fails only its own caller."""
        try:
            results = self.inference.run([p.request for p in live], capture)
        except Exception as e:
            if len(live) > 1:
                for p in live:
                    self._run_group([p], capture)
                return
            live[0].future.set_exception(e)
            return
        for p, r in zip(live, results, strict=True):
            p.future.set_result(r)
