"""The embedded ``tierserve serve`` listens on loopback only (Ray included), with Ray's token authentication on.

A real server (subprocess, tests/serve_process.py). Every listening TCP socket
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
"""

from __future__ import annotations

import ipaddress

from serve_process import ServeProcess


#: Ray Serve replicas: their inter-deployment gRPC server listens on [::] (not configurable in Ray 2.60).
SERVE_REPLICA = "ray::ServeReplica:"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_embedded_serve_binds_only_loopback(smollm_folder):
    server = ServeProcess(smollm_folder)
    try:
        server.wait_ready()
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
    finally:
        server.terminate()
        try:
            server.proc.wait(timeout=120)
        finally:
            server.kill_session()
