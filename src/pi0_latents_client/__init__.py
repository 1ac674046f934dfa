"""A dependency-light client of the latent-recording policy server (msgpack, numpy, websockets; no JAX, no openpi).

Import it in a robot's or a harness's environment (``import pi0_latents_client``): it speaks openpi's websocket
protocol (`openpi.serving.protocol`: msgpack frames, numpy arrays as ``__ndarray__`` maps, metadata first) and adds
the server's record fields so each episode is stored as an episode::

    client = pi0_latents_client.Client(host="127.0.0.1", port=8000)
    client.start_episode(3, task_id=1, task_name="put_the_bowl_on_the_plate", suite="libero_goal")
    chunk = client.infer(element, t=0)["actions"]
    client.end_episode(success=True)

Without `start_episode` it behaves like openpi_client's `WebsocketClientPolicy` (the server then infers episodes).
Its module name differs from `openpi` and `openpi_client`, so it never clashes with an installed openpi.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from websockets.sync.client import connect

__all__ = ["Client", "ServerError", "packb", "unpackb"]


class ServerError(RuntimeError):
    """The server answered with an error (its traceback text) and closed the connection."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "VOc":
            raise TypeError(f"cannot send numpy dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}  # fmt: skip
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=tuple(obj[b"shape"]))
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_default)


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_unpack_hook)


class Client:
    """One websocket connection to the server; `infer` sends an observation dict and returns the action dict."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._ws = connect(f"ws://{host}:{port}", compression=None, max_size=None, additional_headers=headers)
        self.metadata = unpackb(self._ws.recv())
        self._episode: dict[str, Any] | None = None

    def _call(self, request: dict) -> dict:
        self._ws.send(packb(request))
        reply = self._ws.recv()
        if isinstance(reply, str):
            raise ServerError(f"the server refused the request:\n{reply}")
        return unpackb(reply)

    def start_episode(
        self, episode_id: int, task_id: int = 0, *, task_name: str | None = None, suite: str | None = None
    ) -> None:
        """Tags the following `infer` calls with this episode (nothing is sent until the first one)."""
        fields: dict[str, Any] = {"episode_id": int(episode_id), "task_id": int(task_id)}
        fields.update({k: v for k, v in (("task_name", task_name), ("suite", suite)) if v is not None})
        self._episode = fields

    def infer(self, obs: dict, *, t: int | None = None) -> dict:
        """The server's action dict for `obs` (plus the episode's fields and the env step `t`, when given)."""
        request = {**obs, **(self._episode or {})}
        if t is not None:
            request["t"] = int(t)
        return self._call(request)

    def end_episode(self, success: bool) -> dict:
        """Stores the episode's outcome and ends it; returns what the server recorded."""
        fields = {k: v for k, v in (self._episode or {}).items() if k in ("episode_id", "task_id")}
        self._episode = None
        return self._call({**fields, "success": bool(success)})["episode_finished"]

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
