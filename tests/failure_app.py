"""A dedicated tierserve app for the failure tests, and what they need to break it for real.

``failure_app(name, route, **args)`` is a module-fixture generator: it deploys ``build_app`` (real
SmolLM2 worker replicas, one request running each) under its own name and route; the tests pass
``model=`` the fp32 folder that conftest's ``smollm_llm`` reference loads, so greedy answers are
token-identical to it (the default packed Q4_1 GGUF computes in bf16 and may pick another token where
two logits nearly tie), so killing or
closing its replicas never touches the session apps of tests/ray_fixtures.py, and deletes it (with its
tree and metrics actors) at the end. ``replica_pids`` reads the replicas' process ids from Ray's actor
table (Serve names each replica actor ``SERVE_REPLICA::<app>#<deployment>#<replica id>``).
"""

from __future__ import annotations

import json

import requests

#: Worker options shared by the failure apps: one running request per replica so that others wait.
BASE_ARGS = {"max_num_seqs": 1, "num_blocks": 160, "num_threads": 1, "worker_cpus": 0, "max_model_len": 512,
             "metrics_interval_s": 0.25, "retry_after_s": 3}


def failure_app(ray_session, name: str, route: str, **args):
    """Generator: deploy, yield the app's base URL, delete the app and its detached actors."""
    _, port = ray_session
    from ray import serve

    from tierserve.server.app import build_app, delete_app

    serve.run(build_app({**BASE_ARGS, **args, "served_model_name": name}), name=name, route_prefix=route)
    try:
        yield f"http://127.0.0.1:{port}{route}"
    finally:
        delete_app(name)


def replica_pids(app: str, deployment: str = "LLMServer") -> dict[str, int]:
    """Replica id -> pid of every live replica actor of ``deployment``."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["Name"][len(prefix):]: a["Pid"] for a in state.actors().values()
            if a["Name"].startswith(prefix) and a["State"] == "ALIVE"}


def running_replicas(app: str, deployment: str = "LLMServer") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def board_state(ray, app: str) -> dict[str, tuple[int, int]]:
    """Replica id -> (running, waiting) from the app's metrics board (pushed every metrics interval)."""
    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    board = ray.get_actor(metrics_board_name(app), namespace=BOARD_NAMESPACE)
    return {r: (s.running, s.waiting) for r, s in ray.get(board.collect.remote()).items()}


class SSE:
    """A streaming completion read event by event: ``data: {json}`` as dicts, ``data: [DONE]`` as the str."""

    def __init__(self, url: str, body: dict):
        self.resp = requests.post(url, json={**body, "stream": True}, stream=True, timeout=120)
        self._lines = self.resp.iter_lines()
        self.events: list = []

    def next(self):
        for line in self._lines:
            if line.startswith(b"data: "):
                data = line[len(b"data: "):].decode()
                self.events.append(data if data == "[DONE]" else json.loads(data))
                return self.events[-1]
        return None

    def rest(self) -> list:
        while self.next() is not None:
            pass
        return self.events

    def text(self) -> str:
        return "".join(e["choices"][0].get("text", "") for e in self.events
                       if isinstance(e, dict) and e.get("choices"))

    def close(self) -> None:
        self.resp.close()
