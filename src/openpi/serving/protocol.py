"""openpi's policy-server wire protocol, and the optional request fields of a recording harness.

Wire format (what `openpi_client.websocket_client_policy.WebsocketClientPolicy` speaks):
  * websocket, no compression, no frame size limit; an optional ``Authorization: Api-Key <key>`` request header;
  * the server's first frame is the policy metadata (a msgpack map);
  * then, per request, one binary msgpack frame each way: the observation dict in, the action dict out;
  * numpy arrays travel as msgpack maps ``{b"__ndarray__": True, b"data": <bytes>, b"dtype": <dtype.str>,
    b"shape": <list>}`` and numpy scalars as ``{b"__npgeneric__": True, b"data": <item>, b"dtype": <dtype.str>}``;
  * an error is a *text* frame holding the traceback, after which the server closes the connection with
    close code 1011 (INTERNAL_ERROR);
  * ``GET /healthz`` answers HTTP 200 without a websocket upgrade.

Record fields (optional, set by a harness; removed before the policy sees the observation): see `RECORD_FIELDS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

HEALTH_PATH = "/healthz"
API_KEY_SCHEME = "Api-Key"

# Reserved task id of the "connections" pseudo-task: requests without `episode_id` are stored there, one episode per
# connection (or per segment of a connection ended by a `success` frame), in arrival order.
CONNECTIONS_TASK_ID = 9999
# Optional request fields a harness sets, with what they mean (documented in the README).
RECORD_FIELDS: dict[str, str] = {
    "episode_id": "int >= 0: the episode this inference belongs to (harness mode); the store's episode index",
    "task_id": f"int >= 0, not {CONNECTIONS_TASK_ID}: the task of episode_id (default 0)",
    "task_name": "str: the task's name in the store (default task_<task_id>); fixed by the task's first episode",
    "suite": "str: the task's suite in the store (default 'harness'); fixed by the task's first episode",
    "t": "int >= 0: the env step of this inference (default: the inference index in the episode); distinct per episode",
    "success": "bool: ends the episode (a frame with no observation) and stores its outcome",
}


class RequestError(ValueError):
    """A request the server cannot serve; the message names the problem and the fix (sent as the error frame)."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in "VOc":
        raise TypeError(f"cannot send numpy dtype {obj.dtype} (object, void and complex arrays are not supported)")
    if isinstance(obj, np.ndarray):
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=tuple(obj[b"shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"malformed numpy array in the request: {e}") from e
    if b"__npgeneric__" in obj:
        try:
            return np.dtype(obj[b"dtype"]).type(obj[b"data"])
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"malformed numpy scalar in the request: {e}") from e
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_default)


def unpack_request(frame: bytes | str) -> dict[str, Any]:
    """The observation dict of one request frame; `RequestError` for anything else."""
    if isinstance(frame, str):
        raise RequestError("expected a binary msgpack frame (openpi_client's format), got a text frame.")
    try:
        obj = msgpack.unpackb(frame, object_hook=_unpack_hook)
    except RequestError:
        raise
    except Exception as e:  # msgpack raises several types for garbage
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise RequestError(
            f"malformed msgpack frame ({detail}); send a dict packed with openpi_client.msgpack_numpy."
        ) from e
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a dict (observation keys -> values), got {type(obj).__name__}.")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise RequestError(f"request keys must be strings, got {bad[:3]!r}.")
    return obj


@dataclasses.dataclass(frozen=True)
class RecordFields:
    """The harness's record fields of one request (all None: connection mode)."""

    episode_id: int | None = None
    task_id: int | None = None
    task_name: str | None = None
    suite: str | None = None
    t: int | None = None
    success: bool | None = None

    @property
    def is_end(self) -> bool:
        return self.success is not None


def _int_field(request: Mapping[str, Any], name: str) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 0:
        raise RequestError(f"request field {name!r} must be an int >= 0, got {value!r} ({RECORD_FIELDS[name]}).")
    return int(value)


def _str_field(request: Mapping[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"request field {name!r} must be a string, got {type(value).__name__}.")
    return value


def split_request(request: Mapping[str, Any]) -> tuple[dict[str, Any], RecordFields]:
    """(the observation the policy sees, the record fields); raises `RequestError` for a bad field."""
    success = request.get("success")
    if success is not None and not isinstance(success, bool | np.bool_):
        raise RequestError(f"request field 'success' must be a bool, got {success!r} ({RECORD_FIELDS['success']}).")
    fields = RecordFields(
        episode_id=_int_field(request, "episode_id"),
        task_id=_int_field(request, "task_id"),
        task_name=_str_field(request, "task_name"),
        suite=_str_field(request, "suite"),
        t=_int_field(request, "t"),
        success=None if success is None else bool(success),
    )
    if fields.task_id == CONNECTIONS_TASK_ID:
        raise RequestError(f"task_id {CONNECTIONS_TASK_ID} is reserved for the connections pseudo-task; use another.")
    if fields.episode_id is None and (fields.task_id, fields.task_name, fields.suite) != (None, None, None):
        raise RequestError("task_id / task_name / suite need an episode_id (they name the harness's episode).")
    obs = {k: v for k, v in request.items() if k not in RECORD_FIELDS}
    if fields.is_end and obs:
        raise RequestError(
            f"a frame with 'success' ends the episode and carries no observation; it also has {sorted(obs)}. Send the "
            "last observation in its own request first."
        )
    return obs, fields


def check_finite_result(result: Mapping[str, Any], state_key: str) -> None:
    """Raises `RequestError` if the inference produced NaN/inf actions (an extreme but finite state can overflow the
    normalisation): such actions are never sent to the client nor stored."""
    for key in ("actions", "model_actions"):
        values = np.asarray(result[key])
        if not np.all(np.isfinite(values)):
            raise RequestError(
                f"the policy's {key} hold NaN or inf for this observation (its {state_key!r} is probably far outside "
                "the normalisation statistics, e.g. |value| near the float32 limit); nothing was recorded. Send the "
                "robot state in its physical units."
            )


def check_observation(
    obs: Mapping[str, Any], camera_keys: Mapping[str, str], state_key: str, image_shape: tuple[int, ...]
) -> None:
    """Raises `RequestError` naming the problem unless `obs` has the simulator's images, state and a str prompt.

    Images must be uint8 of exactly `image_shape` (the store keeps them; openpi's LIBERO client sends
    ``image_tools.convert_to_uint8(image_tools.resize_with_pad(img, 224, 224))``).
    """
    required = [*camera_keys.values(), state_key]
    missing = [k for k in required if k not in obs]
    if missing:
        raise RequestError(
            f"observation lacks {missing}; this policy needs {required} (+ 'prompt'). Got {sorted(obs)}."
        )
    for key in camera_keys.values():
        image = obs[key]
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != tuple(image_shape):
            got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise RequestError(
                f"observation[{key!r}] must be a uint8 image of shape {list(image_shape)}, got {got}; resize with "
                "openpi_client.image_tools.resize_with_pad and convert_to_uint8 as openpi's LIBERO example does."
            )
    state = obs[state_key]
    if not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind not in "fiu":
        got = f"{state.dtype} {list(state.shape)}" if isinstance(state, np.ndarray) else type(state).__name__
        raise RequestError(f"observation[{state_key!r}] must be a 1-D numeric array, got {got}.")
    if not np.all(np.isfinite(state)):
        raise RequestError(f"observation[{state_key!r}] holds NaN or inf: {state.tolist()}.")
    with np.errstate(over="ignore"):
        as_float32 = state.astype(np.float32)  # the policy computes in float32: 1e300 becomes inf
    if not np.all(np.isfinite(as_float32)):
        raise RequestError(
            f"observation[{state_key!r}] = {state.tolist()} overflows float32 (|value| > 3.4e38), which the policy "
            "computes in; send the robot state in its physical units."
        )
    prompt = obs.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"observation['prompt'] must be a string, got {type(prompt).__name__}.")
