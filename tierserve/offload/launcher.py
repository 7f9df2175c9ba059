"""HostLauncher: start N expert hosts and hand back one ExpertTransport per host; shut them down.

Contract of a ``HostLauncher``:

* ``launch(n, spec) -> dict[str, ExpertTransport]``: start ``n`` hosts configured by
  ``spec`` (:class:`HostSpec`), named ``host0`` .. ``host{n-1}``, each answering on its
  transport when ``launch`` returns (or raise ``TierserveError`` after stopping what it
  started); ``n >= 1`` and a ``spec.channel`` the launcher supports, else
  InvalidParameterError naming the field. ``launch`` may be called once per launcher.
* ``shutdown()``: stop every host it started and release their resources; idempotent.
  The offload hook (tierserve.offload.hook) calls it from ``close()`` when it was built
  by ``offload_from_config``.

Implementations: :class:`ProcessHostLauncher` here (plain local processes serving the
socket channel, no Ray; the engine's default) and ``RayHostLauncher`` in
tierserve/actors/ray_launcher.py (one Ray actor per node advertising the
``expert_host`` resource; the server and the CLI pass it when running on Ray).
``LAUNCHERS`` is the registry of the ones that live at or below this layer.

``ProcessHostLauncher(ip="127.0.0.1", start_timeout_s=120.0)`` runs
``python -m tierserve.offload.host_process --token-stdin`` per host (the token, 32
random bytes, goes through the child's stdin pipe, never on a command line; the child
exits when that pipe closes, so hosts never outlive the worker), reads the one JSON
line each child prints once listening, and connects a ``SocketTransport`` whose
``kill`` sends SIGKILL to that child; ``transports()`` connects a fresh set to the
running hosts (one transport per host and caller: the hook's ``close`` closes its own).
``shutdown`` closes the pipes, waits up to
``STOP_WAIT_S`` seconds per child, then kills what is left. It supports
``channel="socket"`` only.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from tierserve.errors import InvalidParameterError, TierserveError
from tierserve.offload.host_storage import HOST_WEIGHT_FORMATS
from tierserve.offload.socket_channel import TOKEN_BYTES
from tierserve.offload.socket_transport import SocketTransport
from tierserve.offload.transport import ExpertTransport

#: How fused messages reach hosts: a direct TCP channel, or plain Ray actor calls (RayHostLauncher only).
CHANNELS = ("socket", "ray")
#: Seconds ``ProcessHostLauncher.shutdown`` waits for a child to exit after closing its stdin.
STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class HostSpec:
    """How every host of one launch is configured (validated here)."""

    linear_backend: str = "auto"
    weight_format: str = "raw"
    num_threads: int | None = 1
    channel: str = "socket"
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.weight_format not in HOST_WEIGHT_FORMATS:
            raise InvalidParameterError("host_weight_format", f"must be one of {sorted(HOST_WEIGHT_FORMATS)}, "
                                                              f"got {self.weight_format!r}")
        if self.channel not in CHANNELS:
            raise InvalidParameterError("channel", f"must be one of {list(CHANNELS)}, got {self.channel!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidParameterError("host_threads", f"must be >= 1, got {self.num_threads}")
        if self.timeout_s <= 0:
            raise InvalidParameterError("timeout_s", f"must be > 0, got {self.timeout_s}")


def check_host_count(n: int) -> None:
    if n < 1:
        raise InvalidParameterError("expert_hosts", f"must be >= 1, got {n}")


class HostLauncher(ABC):
    """Starts expert hosts and stops them (module doc)."""

    @abstractmethod
    def launch(self, n: int, spec: HostSpec) -> dict[str, ExpertTransport]:
        """``n`` started hosts by name, each behind a connected transport."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every host this launcher started; idempotent."""


class ProcessHostLauncher(HostLauncher):
    """Expert hosts as plain local processes on ``ip`` (module doc)."""

    def __init__(self, ip: str = "127.0.0.1", start_timeout_s: float = 120.0):
        if start_timeout_s <= 0:
            raise InvalidParameterError("start_timeout_s", f"must be > 0, got {start_timeout_s}")
        self.ip = ip
        self.start_timeout_s = start_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._spec: HostSpec | None = None
        self._addresses: dict[str, tuple[tuple[str, int], bytes]] = {}

    def launch(self, n: int, spec: HostSpec) -> dict[str, ExpertTransport]:
        check_host_count(n)
        if spec.channel != "socket":
            raise InvalidParameterError("channel", f"plain-process expert hosts serve the 'socket' channel only, "
                                                   f"got {spec.channel!r} (Ray actor calls need RayHostLauncher)")
        tokens = {f"host{i}": secrets.token_bytes(TOKEN_BYTES) for i in range(n)}
        try:
            for name, token in tokens.items():
                self.procs[name] = self._start(spec, token)
            deadline = time.monotonic() + self.start_timeout_s
            for name in tokens:
                ready = _ready_line(self.procs[name], name, deadline)
                self._addresses[name] = ((ready["ip"], ready["port"]), tokens[name])
            self._spec = spec
            return self.transports()
        except BaseException:
            self.shutdown()
            raise

    def _start(self, spec: HostSpec, token: bytes) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tierserve.offload.host_process", "--host", self.ip, "--port", "0",
               "--token-stdin", "--linear-backend", spec.linear_backend, "--weight-format", spec.weight_format]
        if spec.num_threads is not None:
            cmd += ["--num-threads", str(spec.num_threads)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        proc.stdin.write(token.hex().encode() + b"\n")
        proc.stdin.flush()
        return proc

    def transports(self) -> dict[str, ExpertTransport]:
        """A freshly connected transport per running host (``launch`` returns the first set)."""
        return {name: SocketTransport(address, token, self._spec.timeout_s, stop=self._stopper(name))
                for name, (address, token) in self._addresses.items() if name in self.procs}

    def _stopper(self, name: str):
        def stop() -> None:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        return stop

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def shutdown(self) -> None:
        for proc in self.procs.values():
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self._addresses.clear()


def _ready_line(proc: subprocess.Popen, name: str, deadline: float) -> dict:
    """The JSON line a host process prints once listening (tierserve.offload.host_process)."""
    fd = proc.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TierserveError(f"expert host {name} (pid {proc.pid}) did not start listening in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise TierserveError(f"expert host {name} exited with code {proc.wait()} before listening "
                                 f"(its stderr is above)")
        buf += chunk
    return json.loads(buf)


#: Launchers by name that need nothing above this layer (RayHostLauncher is registered by its callers).
LAUNCHERS: dict[str, type[HostLauncher]] = {"process": ProcessHostLauncher}
