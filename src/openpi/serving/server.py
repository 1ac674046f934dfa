"""The websocket policy server: openpi's protocol (`protocol`), one recorded step per inference (`recording`).

Each connection gets the metadata frame, then one action dict per observation. Requests are decoded, checked and
recorded on worker threads; the model runs in `engine` (requests waiting at the same time share one batched call).
A bad request gets a traceback text frame and its connection is closed with 1011 (INTERNAL_ERROR), as openpi's server
does; other connections and every record already written are unaffected. A request whose inference gives NaN/inf
actions is refused the same way (nothing sent, nothing stored). A step is recorded only once its reply was sent, so
the store never holds an inference the client did not get (e.g. when the server stops mid-request); the episodes open
when the server stops end with "server stopped". Frames over ``max_frame_bytes`` close the connection (1009).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from openpi.serving import protocol
from openpi.serving.engine import Engine
from openpi.serving.protocol import RequestError
from openpi.serving.recording import Recorder, Session

logger = logging.getLogger(__name__)
ERROR_REASON = "Internal server error. Traceback included in previous frame."


class PolicyServer:
    """Serves `engine` to openpi clients and records through `recorder`.

    Args:
        prompt: None: the request's prompt; a string: the prompt every inference gets (the request's is stored as
            ``sent_prompt``).
        max_workers: requests decoded / recorded / waiting for the model at once (connections beyond wait).
        max_frame_bytes: the largest websocket frame accepted (16 MiB: two 224x224x3 uint8 images and a state are
            about 0.3 MB); a larger one closes its connection with 1009 (message too big) before it is buffered.
    """

    def __init__(
        self,
        engine: Engine,
        recorder: Recorder,
        metadata: Mapping[str, Any],
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        prompt: str | None = None,
        max_workers: int = 32,
        max_frame_bytes: int = 16 << 20,
    ):
        self.engine, self.recorder, self.metadata = engine, recorder, dict(metadata)
        self.host, self.port, self.api_key, self.prompt = host, port, api_key, prompt
        self.max_frame_bytes = max_frame_bytes
        self._stopping = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="policy-request")
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    # --- HTTP side: health check and API key, before the websocket upgrade ----------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == protocol.HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            sent = request.headers.get("Authorization", "")
            expected = f"{protocol.API_KEY_SCHEME} {self.api_key}"
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                logger.warning("Refused %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Missing or wrong API key.\n")
        return None

    # --- one request (on a worker thread) -----------------------------------------------------------------------
    def _serve_one(
        self, session: Session, frame: bytes | str, received: float
    ) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """(reply, the step's record to queue once the reply is sent, or None)."""
        obs, fields = protocol.split_request(protocol.unpack_request(frame))
        if fields.is_end:
            return {"episode_finished": session.end(fields)}, None
        sim = self.recorder.simulator
        protocol.check_observation(obs, sim.camera_keys, sim.state_key, sim.image_shape)
        sent = obs.get("prompt")
        prompt = sent if self.prompt is None else self.prompt
        if prompt is None:
            raise RequestError("observation lacks 'prompt' (the instruction, a string).")
        episode = session.episode_for(fields, prompt)
        t = episode.next_t(fields.t)
        self.recorder.check_step(episode, obs)
        result = self.engine.infer({**obs, "prompt": prompt}, next(episode.noise))
        protocol.check_finite_result(result, sim.state_key)

        def record() -> None:
            self.recorder.record(
                episode,
                t,
                obs,
                result,
                prompt=prompt,
                received_time=received,
                sent_prompt=None if self.prompt is None else (sent or ""),
            )

        return {
            "actions": result["actions"],
            "state": result["state"],
            "policy_timing": result["policy_timing"],
            "record": {
                "task_id": episode.key[0],
                "episode_id": episode.key[1],
                "t": t,
                "step": episode.num_inferences,
            },
        }, record

    # --- one connection -----------------------------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self._connections += 1
        number = self._connections
        session = Session(self.recorder, {"connection": number, "peer": _peer(ws)})
        logger.info("Connection %d from %s", number, _peer(ws))
        end = "connection closed"
        try:
            await ws.send(protocol.packb(self.metadata))
            prev_total_ms = None
            while True:
                try:
                    frame = await ws.recv()
                except websockets.ConnectionClosed:
                    break
                start = time.monotonic()
                try:
                    response, record = await loop.run_in_executor(
                        self._pool, self._serve_one, session, frame, time.time()
                    )
                except Exception as e:
                    end = f"error: {type(e).__name__}"
                    logger.warning("Connection %d: %s: %s", number, type(e).__name__, e)
                    await ws.send(traceback.format_exc())
                    await ws.close(CloseCode.INTERNAL_ERROR, ERROR_REASON)
                    break
                response["server_timing"] = {"infer_ms": (time.monotonic() - start) * 1000.0}
                if prev_total_ms is not None:
                    response["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(protocol.packb(response))  # raises ConnectionClosed if the client cannot get it
                if record is not None:  # the client has its reply: now the step counts
                    try:
                        await loop.run_in_executor(self._pool, record)
                    except Exception as e:  # a store failure: this connection stops, the others go on
                        end = f"error: {type(e).__name__}"
                        logger.error("Connection %d: recording failed: %s: %s", number, type(e).__name__, e)
                        await ws.close(CloseCode.INTERNAL_ERROR, ERROR_REASON)
                        break
                prev_total_ms = (time.monotonic() - start) * 1000.0
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._stopping and end == "connection closed":
                end = "server stopped"
            await loop.run_in_executor(self._pool, session.close, end)
            logger.info("Connection %d closed (%s)", number, end)

    # --- running ------------------------------------------------------------------------------------------------
    async def serve(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serves until `stop()`; `on_ready(port)` once listening (the bound port, also for port 0)."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(
            self._handler,
            self.host,
            self.port,
            compression=None,
            max_size=self.max_frame_bytes,
            process_request=self._process_request,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            if on_ready is not None:
                on_ready(self.port)
            await self._stop.wait()
            self._stopping = True  # the connections closed by leaving this block end their episodes "server stopped"
        self._pool.shutdown(wait=True)
        self.engine.close()
        self.recorder.close("server stopped")

    def stop(self) -> None:
        """Stops serving (thread-safe): open connections are closed and their episodes ended."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed meanwhile: already stopped
                pass

    def start_in_thread(self, timeout: float = 60.0) -> int:
        """Serves on a daemon thread; returns the bound port once listening."""
        ready = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(self.serve(lambda _: ready.set())), daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the server did not start listening on {self.host}:{self.port} within {timeout}s")
        self._thread = thread
        return self.port

    def join(self, timeout: float | None = None) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout)


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
