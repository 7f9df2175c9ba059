"""``ServeProcess``: ``tierserve serve`` as an operator runs it, a subprocess in its own session.

Started with the session's SmolLM2 folder on a free loopback port, Ray's usage
stats off and its token authentication on (Ray 2.60's default, made explicit).
``wait_ready`` polls ``/health``; ``tree`` lists the live processes of the
server's process tree; ``stop`` sends SIGTERM and waits, killing the session's
processes only if the server hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil

from polling import wait_for
from ray_fixtures import free_port


class ServeProcess:
    def __init__(self, model: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierserve.cli", "serve", "--model", model, "--port", str(self.port),
             "--num-blocks", "256", "--max-num-seqs", "4", *flags],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, timeout_s=timeout_s, interval_s=1.0)

    def tree(self) -> list[psutil.Process]:
        """The server and every live process under it (Ray's GCS, raylet, agents, workers)."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def session_processes(self) -> list[psutil.Process]:
        """Live (non-zombie) processes of the server's session, wherever they were reparented."""
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        return out

    def kill_session(self) -> None:
        """Last resort after a failed test: SIGKILL whatever is left of this server's session."""
        for p in self.session_processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
