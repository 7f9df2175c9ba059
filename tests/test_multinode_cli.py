"""Real multi-node: two Ray nodes started with the ``ray start`` CLI on distinct loopback addresses.

The head runs on 127.0.0.2, the second node on 127.0.0.3 advertising
``{"expert_host": 1}``: the MoE engine (driver process tests/multinode_driver.py,
beside the head) keeps its cold experts on an ``ExpertHost`` actor that Ray can
only place on the second node, whose socket channel is bound to that node's
address. The driver kills every process of the second node after a few
decode steps; the pool fails the host over (its experts re-read from the
checkpoint and built on the worker) and the greedy output is still identical
to the all-resident reference.

Ray's token authentication is on (``RAY_AUTH_MODE=token``, a fresh token in
the environment of every process of this cluster). Every port the CLI lets
us choose is chosen here (free ports on loopback), the cluster's processes
live under their own temporary directory, and every process whose command
line names that directory or one of the two addresses is killed at the end
(``ray stop`` would also stop the test session's own cluster).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from model_harness import MOE_PROMPT, tiny_moe_reference
from multinode_driver import node_processes
from polling import pid_gone
from ray_fixtures import free_ports

pytestmark = pytest.mark.ray  # its subprocesses start Ray: one Ray instance at a time (tests/conftest.py)

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"


PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port")


def _ray_start(args: list[str], env: dict, temp_dir: str, node_ports: list[int]) -> None:
    """``ray start`` with ``args`` and each of the node's own ports fixed (``node_ports``, distinct)."""
    ports = dict(zip(PORT_FLAGS, node_ports, strict=True))
    cmd = [shutil.which("ray") or "ray", "start", *args, "--num-cpus=1", "--disable-usage-stats",
           f"--temp-dir={temp_dir}", "--object-store-memory=80000000",
           *[f"{k}={v}" for k, v in ports.items()]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _cleanup(temp_dir: str) -> list[int]:
    """Kill every process of the two nodes; returns those still alive afterwards (should be none)."""
    pids = set(node_processes(temp_dir)) | set(node_processes(HEAD_IP)) | set(node_processes(NODE_IP))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = set(node_processes(temp_dir)) | set(node_processes(HEAD_IP)) | set(node_processes(NODE_IP))
        left = {p for p in left if not pid_gone(p)}
        if not left:
            return []
        time.sleep(0.2)
    return sorted(left)



def test_moe_cold_experts_on_a_second_ray_start_node_survive_its_death(tmp_path, smollm_folder):
    model = str(tmp_path / "moe")
    tiny_moe_reference(model, seed=11, new_tokens=1)
    temp_dir = tempfile.mkdtemp(prefix="trs-ray-", dir="/tmp")  # short: Ray's socket paths live below it
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (set by the suite's own Ray fixtures, and by the embedded serve)
    # is Ray's single-node mode, in which `ray start --address` refuses to add a node: multi-node needs 1
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
    # every port of both nodes chosen at once, so no two components (nor the two nodes) are handed the same one
    port, client_port, *ports = free_ports(2 + 2 * len(PORT_FLAGS))
    try:
        _ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--include-dashboard=false",
                    f"--ray-client-server-port={client_port}"], env, temp_dir, ports[:len(PORT_FLAGS)])
        _ray_start([f"--address={HEAD_IP}:{port}", f"--node-ip-address={NODE_IP}",
                    '--resources={"expert_host": 1}'], env, temp_dir, ports[len(PORT_FLAGS):])
        cfg = {"address": f"{HEAD_IP}:{port}", "node_ip": HEAD_IP, "victim_ip": NODE_IP, "model": model,
               "tokenizer": smollm_folder, "out": str(tmp_path / "result.json"),
               "prompts": [[MOE_PROMPT, 12], [MOE_PROMPT[::-1], 16], [MOE_PROMPT[3:], 10]]}
        with open(tmp_path / "cfg.json", "w") as f:
            json.dump(cfg, f)
        driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_driver.py")
        proc = subprocess.run([sys.executable, driver, str(tmp_path / "cfg.json")], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.load(open(cfg["out"]))
    finally:
        left = _cleanup(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result["host_ips"] == [NODE_IP]          # the channel is bound to the second node's address
    assert result["host_nodes"] == [HEAD_IP, NODE_IP]
    assert result["killed"] > 0 and len(result["failures"]) == 1
    assert result["got"] == result["expected"]      # identical greedy output across the node's death
    assert not left, f"processes of the test cluster still running: {left}"
