"""Drain: SIGTERM to ``tierserve serve`` lets the in-flight stream finish, answers new requests 503, stops everything.

A real server (subprocess, tests/serve_process.py) on SmolLM2. A streaming
completion of 48 tokens (ignore_eos) is started and its first token read; then
SIGTERM. While the stream goes on, a new completion gets 503 with
Retry-After and error code ``draining`` (the ingress's admission is closed
during the grace period: it answers, it does not refuse connections). The
stream then ends with a finish_reason and ``[DONE]`` and no error event, the
server exits 0, and none of the processes of its tree recorded before the
signal (Ray's GCS, raylet, dashboard agents, workers) nor any other process of
its session is left.
"""

from __future__ import annotations

import json

import httpx
import psutil

from polling import wait_for
from serve_process import ServeProcess

MAX_TOKENS = 48


def test_sigterm_drains_in_flight_stream_rejects_new_and_stops_every_process(smollm_folder):
    server = ServeProcess(smollm_folder, "--drain-timeout-s", "60", "--retry-after-s", "3")
    try:
        server.wait_ready()
        before = server.tree()
        assert len(before) > 3, [p.name() for p in before]  # Ray's own processes run under the server
        body = {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=server.url, timeout=120) as client:
            with client.stream("POST", "/v1/completions", json=body) as stream:
                assert stream.status_code == 200
                events = []
                lines = stream.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                        break
                server.terminate()

                def rejected():
                    r = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 1})
                    return r if r.status_code == 503 else None
                r = wait_for(rejected, timeout_s=60, interval_s=0.2)
                assert r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "draining"
                events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not [c for c in chunks if "error" in c], chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"]) for c in chunks) >= 1
        assert server.proc.wait(timeout=120) == 0
        wait_for(lambda: not [p for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                 timeout_s=30, show=lambda: [(p.pid, p.name()) for p in before if p.is_running()])
        assert not server.session_processes()
    finally:
        server.kill_session()
