"""The policy server (openpi.serving, scripts/serve_policy.py) driven by the real openpi_client.

The server runs the tiny random-weight preset (3 denoising steps) on loopback, on a thread of this process (sharing
the compiled model with the in-process reference) or, for the SIGKILL test, as the CLI in a subprocess. Expected
actions come from the in-process `Policy.infer` with the noise the server documents: inference i of episode
(task, k) uses draw i of ``numpy.random.default_rng([seed, task, k]).standard_normal((H, AD), float32)``.
"""

from __future__ import annotations

import collections
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client import websocket_client_policy as wcp

import expert_data_utils
from openpi import envs, serving
from openpi.policies import policy_config
from openpi.serving.client import RecordingClient

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:robosuite"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
    # openpi_client calls websockets' connect() outside a context manager (its own code, unchanged here).
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"),
]

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET, STEPS, SEED = "pi0_libero_tiny", 3, 7
CONN = serving.CONNECTIONS_TASK_ID
REPLAN = 5  # openpi's LIBERO example: replan every 5 steps


@pytest.fixture(scope="module")
def policy():
    return policy_config.create_trained_policy(PRESET, sample_kwargs={"num_steps": STEPS}, rng_seed=SEED)


def noises(policy, task_id: int, k: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng([SEED, task_id, k])
    return [rng.standard_normal((policy.action_horizon, policy.action_dim), dtype=np.float32) for _ in range(n)]


def observation(seed: int, prompt: str = "open the middle drawer of the cabinet") -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": prompt,
    }


class Served:
    def __init__(self, policy, out: pathlib.Path, **overrides):
        args = serving.ServeArgs(preset=PRESET, port=0, num_denoise_steps=STEPS, seed=SEED, output_dir=out, **overrides)
        self.out = out
        self.server = serving.create_server(args, policy=policy)
        self.port = self.server.start_in_thread()

    def client(self, **kw) -> wcp.WebsocketClientPolicy:
        return wcp.WebsocketClientPolicy(host="127.0.0.1", port=self.port, **kw)

    def stop(self) -> None:
        self.server.stop()
        self.server.join(60)


@pytest.fixture
def served(policy, tmp_path):
    s = Served(policy, tmp_path / "store")
    yield s
    s.stop()


def assert_infer_equal(policy, element: dict, noise: np.ndarray, actions: np.ndarray) -> None:
    expected = policy.infer(element, noise=noise)["actions"]
    np.testing.assert_array_equal(actions, expected)


@pytest.mark.libero
def test_libero_episode_through_openpi_client(policy, served):
    """openpi's LIBERO example loop, unchanged, against the server: actions = in-process infer, store = the episode."""
    sim = envs.get("libero")
    sim.configure()
    task = sim.get_task("libero_goal", 0)
    client = served.client()
    assert client.get_server_metadata()["latent_recording"]["connections_task_id"] == CONN
    sent, got, step_t = [], [], []
    with sim.make_env(task, SEED) as env:
        obs = env.reset(0)
        plan: collections.deque = collections.deque()
        for t in range(12):
            if not plan:
                element = env.policy_input(obs, env.prompt)
                response = client.infer(element)
                assert {"actions", "server_timing", "policy_timing"} <= response.keys()
                assert response["server_timing"]["infer_ms"] > 0
                sent.append(element)
                got.append(response["actions"])
                step_t.append(t)
                plan.extend(response["actions"][:REPLAN])
            obs, _, done, _ = env.step(plan.popleft())
            if done:
                break
    client._ws.close()
    served.stop()
    assert len(sent) == 3  # t = 0, 5, 10
    for element, noise, actions in zip(sent, noises(policy, CONN, 0, 3), got, strict=True):
        assert_infer_equal(policy, element, noise, actions)

    data = expert_data_utils.load_inference_task_data(served.out, task_id=CONN)
    episode = data["episodes"]["episode_0"]
    assert episode["metadata"]["success"] is None and episode["metadata"]["end"] == "connection closed"
    steps = episode["rollout_steps"]
    assert sorted(steps) == ["step_0", "step_1", "step_2"]  # one per inference, t = inference index
    for i, (element, actions) in enumerate(zip(sent, got, strict=True)):
        step = steps[f"step_{i}"]
        np.testing.assert_array_equal(step["actions"], actions.astype(np.float32))
        np.testing.assert_array_equal(step["image"], element["observation/image"])
        np.testing.assert_array_equal(step["wrist_image"], element["observation/wrist_image"])
        np.testing.assert_array_equal(step["state"], element["observation/state"].astype(np.float32))
        assert step["prompt"] == task.language
        assert step["expert_0_segment_means"].shape[0] == policy.model.config.depth
    times = [float(steps[f"step_{i}"]["received_time"]) for i in range(3)]
    assert times == sorted(times) and abs(times[0] - time.time()) < 3600


def test_harness_fields_name_the_episode(policy, served):
    """RecordingClient's episode_id / task_id / t / success: stored as that episode, fields unseen by the policy."""
    client = RecordingClient(host="127.0.0.1", port=served.port)
    client.start_episode(5, task_id=3, task_name="drawer", suite="libero_goal")
    elements = [observation(i) for i in range(2)]
    responses = [client.infer(e, t=t) for e, t in zip(elements, (0, 5), strict=True)]
    assert [r["record"]["t"] for r in responses] == [0, 5]
    finished = client.end_episode(success=True)
    assert finished["success"] is True and finished["num_inferences"] == 2
    for e, n, r in zip(elements, noises(policy, 3, 5, 2), responses, strict=True):
        assert_infer_equal(policy, e, n, r["actions"])  # the record fields changed nothing
    data = expert_data_utils.load_inference_task_data(served.out, task_id=3)
    assert (data["task_id"], data["task_name"], data["suite"]) == (3, "drawer", "libero_goal")
    episode = data["episodes"]["episode_5"]
    assert episode["metadata"]["success"] is True and episode["metadata"]["end"] == "reported"
    assert sorted(episode["rollout_steps"]) == ["step_0", "step_5"]  # steps are named by t
    assert int(episode["rollout_steps"]["step_5"]["t"]) == 5


def test_api_key_and_health_check(policy, tmp_path):
    s = Served(policy, tmp_path / "store", api_key="s3cret")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz", timeout=10) as r:
            assert r.status == 200
        for key in (None, "wrong"):
            with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
                s.client(api_key=key)
        assert "latent_recording" in s.client(api_key="s3cret").get_server_metadata()
    finally:
        s.stop()


def raw_connection(port: int):
    ws = websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
    msgpack_numpy.unpackb(ws.recv())  # the metadata frame
    return ws


def expect_error(port: int, frame: bytes, needle: str) -> None:
    """The server answers `frame` with a traceback text frame naming the problem, then closes with 1011."""
    ws = raw_connection(port)
    ws.send(frame)
    reply = ws.recv(timeout=60)
    assert isinstance(reply, str) and "Traceback" in reply and needle in reply, reply[-500:]
    with pytest.raises(websockets.ConnectionClosedError) as info:
        ws.recv(timeout=10)
    assert info.value.rcvd.code == 1011


def test_bad_requests_get_an_error_frame_and_others_continue(policy, served):
    good = served.client()
    first = good.infer(observation(0))
    bad_image = {**observation(1), "observation/image": np.zeros((224, 224, 3), np.float32)}
    expect_error(served.port, b"\xc1 not msgpack", "malformed msgpack frame")
    expect_error(served.port, msgpack_numpy.packb([1, 2]), "must be a dict")
    expect_error(served.port, msgpack_numpy.packb({"prompt": "x"}), "observation lacks")
    expect_error(served.port, msgpack_numpy.packb(bad_image), "uint8 image of shape [224, 224, 3], got float32")
    expect_error(served.port, msgpack_numpy.packb({**observation(1), "t": -1}), "'t' must be an int >= 0")
    # Issue 19 item 11: a state of length 9 fails inside the input transforms, after its episode was opened.
    expect_error(served.port, msgpack_numpy.packb({**observation(1), "observation/state": np.zeros(9, np.float32)}), "")
    # Issue 19 item 4: states that overflow float32, or the normalisation: refused, nothing sent or stored.
    huge64 = {**observation(1), "observation/state": np.full(8, 1e300)}
    expect_error(served.port, msgpack_numpy.packb(huge64), "overflows float32")
    huge32 = {**observation(1), "observation/state": np.full(8, 3e38, np.float32)}
    expect_error(served.port, msgpack_numpy.packb(huge32), "hold NaN or inf for this observation")
    second = good.infer(observation(2))  # the good connection was never disturbed
    for e, n, r in zip((observation(0), observation(2)), noises(policy, CONN, 0, 2), (first, second), strict=True):
        assert_infer_equal(policy, e, n, r["actions"])
    served.stop()
    data = expert_data_utils.load_inference_task_data(served.out, task_id=CONN)
    episodes = data["episodes"]
    assert len(episodes["episode_0"]["rollout_steps"]) == 2  # the good connection's records are all there
    assert list(episodes) == ["episode_0"]  # the refused connections left no (empty, complete) episode
    steps = episodes["episode_0"]["rollout_steps"].values()
    assert all(np.isfinite(step["actions"]).all() and np.isfinite(step["state"]).all() for step in steps)


def test_oversized_frame_closes_its_connection(served):
    """Issue 19 item 9: a frame over max_frame_bytes (default 16 MiB) is refused with 1009 (message too big)."""
    ws = raw_connection(served.port)
    ws.send(b"\x00" * (17 << 20))
    with pytest.raises(websockets.ConnectionClosedError) as info:
        ws.recv(timeout=60)
    assert info.value.rcvd.code == 1009
    assert served.client().infer(observation(0))["actions"].shape[0] > 0  # the server goes on


def test_stop_mid_request_records_only_replied_steps_and_says_server_stopped(policy, tmp_path):
    """Issue 19 item 10: an inference in flight at shutdown is neither replied nor stored; the end reason says so."""
    served = Served(policy, tmp_path / "store", batch_wait_ms=3000)  # the 2nd request waits 3 s in the batcher
    ws = raw_connection(served.port)
    ws.send(msgpack_numpy.packb(observation(0)))
    assert "actions" in msgpack_numpy.unpackb(ws.recv(timeout=120))
    ws.send(msgpack_numpy.packb(observation(1)))
    time.sleep(0.5)
    served.stop()
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            ws.recv(timeout=60)  # no reply to the 2nd request
    episode = expert_data_utils.load_inference_task_data(served.out, task_id=CONN)["episodes"]["episode_0"]
    assert len(episode["rollout_steps"]) == 1  # one reply, one record
    assert episode["metadata"]["end"] == "server stopped"


def test_concurrent_clients_are_batched(policy, tmp_path):
    """Two clients inferring at the same time share batched calls and both get their own correct actions."""
    served = Served(policy, tmp_path / "store", batch_wait_ms=500)  # a wide window: this machine is loaded
    clients = [served.client(), served.client()]
    results: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        for j in range(2):
            barrier.wait()
            results[i].append(clients[i].infer(observation(10 * i + j)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    served.stop()
    sizes = [r["policy_timing"]["batch_size"] for i in range(2) for r in results[i]]
    assert len(sizes) == 4 and 2 in sizes, sizes  # requests sent together ran in one call
    for i in range(2):
        k = results[i][0]["record"]["episode_id"]  # connection episodes are numbered in order of first request
        for j, (r, n) in enumerate(zip(results[i], noises(policy, CONN, k, 2), strict=True)):
            expected = policy.infer(observation(10 * i + j), noise=n)["actions"]
            np.testing.assert_allclose(r["actions"], expected, rtol=0, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkill_keeps_finished_records(tmp_path):
    out, port = tmp_path / "store", free_port()
    cmd = [sys.executable, str(REPO / "scripts" / "serve_policy.py"), "--preset", PRESET, "--port", str(port),
           "--num-denoise-steps", str(STEPS), "--output-dir", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while line and "Serving on" not in line:
            line = proc.stdout.readline()
        assert "Serving on" in line, "the server did not start"
        client = RecordingClient(host="127.0.0.1", port=port)
        client.start_episode(0, task_id=1)
        client.infer(observation(0), t=0)
        client.infer(observation(1), t=5)
        client.end_episode(success=False)  # answered once the episode is on disk
        client.start_episode(1, task_id=1)
        client.infer(observation(2), t=0)  # an unfinished episode
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    data = expert_data_utils.load_inference_task_data(out, task_id=1)
    assert list(data["episodes"]) == ["episode_0"]  # the unfinished episode stays hidden
    episode = data["episodes"]["episode_0"]
    assert episode["metadata"]["success"] is False and len(episode["rollout_steps"]) == 2
    assert episode["rollout_steps"]["step_5"]["actions"].shape == (50, 7)


def test_intervention_file(tmp_path):
    from openpi.models import intervention as iv
    from openpi.models.intervention_file import load_intervention

    np.save(tmp_path / "v.npy", np.arange(4, dtype=np.float32))
    path = tmp_path / "iv.json"
    path.write_text(
        '{"ops": [{"op": "knockout_attention", "queries": "all", "keys": "text"},'
        ' {"op": "steer", "expert": 1, "tokens": [1, 3], "layers": [0], "vector": {"npy": "v.npy"}, "alpha": 2.0}]}'
    )
    loaded = load_intervention(path)
    expected = iv.knockout_attention("all", "text") + iv.steer(1, (1, 3), (0,), np.arange(4.0), alpha=2.0)
    assert iv.describe(loaded) == iv.describe(expected)
    np.testing.assert_array_equal(loaded.ops[1].vector, np.arange(4.0))
    path.write_text('{"ops": [{"op": "knockout", "queries": "all", "keys": "text"}]}')  # the collection's alias
    assert iv.describe(load_intervention(path)) == iv.describe(iv.knockout_attention("all", "text"))
    path.write_text('{"ops": [{"op": "flip", "queries": "all"}]}')
    with pytest.raises(ValueError, match="unknown op 'flip'"):
        load_intervention(path)
    path.write_text(
        '{"ops": [{"op": "steer", "expert": 1, "tokens": "actions", "layers": [0], "vector": [1], "beta": 1}]}'
    )
    with pytest.raises(ValueError, match=r"unknown arguments \['beta'\]"):
        load_intervention(path)
