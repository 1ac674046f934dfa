"""`RecordingClient`: openpi_client's `WebsocketClientPolicy` plus the record fields of this server.

A harness that wants its episodes stored as episodes (not one sequence per connection)::

    client = RecordingClient(host="127.0.0.1", port=8000)
    client.start_episode(task_id=3, episode_id=k, task_name="put_the_bowl_on_the_plate", suite="libero_goal")
    for each replan: chunk = client.infer(element, t=t)["actions"]
    client.end_episode(success=done)

The fields go in the request dict (names: `openpi.serving.protocol.RECORD_FIELDS`); the server removes them before the
policy sees the observation. Any other openpi client can add them the same way. Needs ``openpi-client``.
"""

from __future__ import annotations

from typing import Any


class RecordingClient:
    """Wraps `openpi_client.websocket_client_policy.WebsocketClientPolicy` (same constructor arguments)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, api_key: str | None = None):
        try:
            from openpi_client import websocket_client_policy
        except ImportError as e:  # a dev dependency here; robots install it anyway
            raise ImportError(
                "RecordingClient needs openpi-client: uv sync --group dev (or pip install openpi-client)."
            ) from e
        self.policy = websocket_client_policy.WebsocketClientPolicy(host=host, port=port, api_key=api_key)
        self._episode: dict[str, Any] | None = None

    def get_server_metadata(self) -> dict:
        return self.policy.get_server_metadata()

    def start_episode(
        self, episode_id: int, task_id: int = 0, *, task_name: str | None = None, suite: str | None = None
    ) -> None:
        """Tags the following `infer` calls with this episode (nothing is sent until the first one)."""
        fields: dict[str, Any] = {"episode_id": int(episode_id), "task_id": int(task_id)}
        if task_name is not None:
            fields["task_name"] = task_name
        if suite is not None:
            fields["suite"] = suite
        self._episode = fields

    def infer(self, obs: dict, *, t: int | None = None) -> dict:
        """`WebsocketClientPolicy.infer` with the episode's fields (and the env step `t`, when given)."""
        request = {**obs, **(self._episode or {})}
        if t is not None:
            request["t"] = int(t)
        return self.policy.infer(request)

    def end_episode(self, success: bool) -> dict:
        """Stores the episode's outcome and ends it; returns what the server recorded."""
        fields = {k: v for k, v in (self._episode or {}).items() if k in ("episode_id", "task_id")}
        self._episode = None
        return self.policy.infer({**fields, "success": bool(success)})["episode_finished"]

    def reset(self) -> None:
        self.policy.reset()
