"""The embedded ``tierserve serve`` as an operator runs it: loopback only, then a drain on SIGTERM.

One real server (subprocess, tests/serve_process.py) on SmolLM2 serves both tests of this module, in
this order (the second ends it; either also runs alone, starting its own).

Security: every listening TCP socket
of its process tree (the CLI process, Ray's GCS, raylet, dashboard and
runtime-env agents, workers, Serve's proxy and replicas) is bound to a
loopback address (127.0.0.0/8, ::1 or IPv4-mapped ::ffff:127.x): none to a
wildcard (0.0.0.0, ::) nor to any of the machine's non-loopback addresses.
With the node on 127.0.0.1 Ray 2.60 binds its GCS, raylet, agent and worker
ports there. One exception cannot be configured and is allowed by name (the
README's Security section lists it): each Serve replica's inter-deployment
gRPC server, which Ray Serve 2.60 binds to ``[::]:0`` (all interfaces, a random
port; ray/serve/_private/replica.py ``_on_initialized``): exactly one such
socket per ``ray::ServeReplica`` process, nothing else. The dashboard is off (no process listens on its default port
8265), and the node's address Ray advertises is 127.0.0.1.

Drain: a streaming
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

import contextlib
import ipaddress
import json
import subprocess

import httpx
import psutil
import pytest

from polling import wait_for
from serve_process import ServeProcess

pytestmark = pytest.mark.ray  # its subprocesses start Ray: one Ray instance at a time (tests/conftest.py)

MAX_TOKENS = 48
#: Ray Serve replicas: their inter-deployment gRPC server listens on [::] (not configurable in Ray 2.60).
SERVE_REPLICA = "ray::ServeReplica:"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.fixture(scope="module")
def server(smollm_folder):
    """One running ``tierserve serve`` (drain grace 60 s, Retry-After 3 s); whatever is left is killed at the end."""
    proc = ServeProcess(smollm_folder, "--drain-timeout-s", "60", "--retry-after-s", "3")
    try:
        proc.wait_ready()
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(timeout=120)
        proc.kill_session()


def test_embedded_serve_binds_only_loopback(server):
    listening = []
    for proc in server.tree():
        for conn in proc.net_connections("inet"):
            if conn.status == "LISTEN":
                listening.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert len(listening) >= 5, listening  # GCS, raylet, agents, proxy: the check saw Ray's sockets
    assert (server.port,) in {(port,) for _, _, port in listening}
    exposed = [entry for entry in listening if not _loopback(entry[1])]
    allowed = [e for e in exposed if e[0].startswith(SERVE_REPLICA) and e[1] == "::"]
    assert exposed == allowed, exposed
    assert sorted(e[0] for e in allowed) == sorted(
        {name for name, _, _ in listening if name.startswith(SERVE_REPLICA)})  # one per replica
    assert 8265 not in {port for _, _, port in listening}  # no dashboard


def test_sigterm_drains_in_flight_stream_rejects_new_and_stops_every_process(server):
    try:
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
