"""SocketTransport: the ExpertTransport over the socket channel (tierserve.offload.socket_channel).

Two connections to the host: one for fused dispatch (``submit``; the engine's step
thread, one outstanding call) and one for control calls (loads, expert copies, stats),
guarded by a lock because spare-slot fills call it from their background thread while
a fused call may be in flight. A failed connect or send is returned as a
``FailedCall`` (``submit`` never raises); a failed read raises ``ChannelError``.

``kill()`` runs the ``stop`` callback the launcher gave (terminate the host process, or
kill its Ray actor) after shutting both connections down, which wakes any read blocked
on another thread; ``close()`` only drops the connections (the host process stays up
until its launcher shuts it down).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from tierserve.offload.expert_transit import ExpertPayload
from tierserve.offload.socket_channel import ChannelError, SocketChannel
from tierserve.offload.transport import ExpertTransport, FailedCall, HostStats, PendingCall

Key = tuple[int, int]


class SocketCall(PendingCall):
    """The reply of one fused message on a socket channel."""

    def __init__(self, channel: SocketChannel):
        self.channel = channel

    def result(self, deadline: float) -> np.ndarray:
        return self.channel.recv(deadline)


class SocketTransport(ExpertTransport):
    """``address`` (ip, port) and ``token`` of a host serving the channel; ``timeout_s`` the default for connects
    and control calls; ``stop`` what ``kill`` runs to stop the host (None: nothing beyond closing)."""

    def __init__(self, address: tuple[str, int], token: bytes, timeout_s: float,
                 stop: Callable[[], None] | None = None):
        self.address = tuple(address)
        self.timeout_s = timeout_s
        self._stop = stop
        self._lock = threading.Lock()
        self._dispatch = SocketChannel(self.address, timeout_s, token)
        self._control = SocketChannel(self.address, timeout_s, token)
        self._dead = False

    def submit(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str) -> PendingCall:
        if self._dead:
            return FailedCall(ChannelError(f"host {self.address} was killed"))
        try:
            self._dispatch.send(layer, x, expert_ids, dtype)
        except ChannelError as exc:
            return FailedCall(exc)
        return SocketCall(self._dispatch)

    def _call(self, method: str, *args, timeout_s: float | None):
        if self._dead:
            raise ChannelError(f"host {self.address} was killed")
        with self._lock:
            return self._control.call(method, *args, timeout_s=timeout_s)

    def load_experts(self, payloads: dict[Key, ExpertPayload], timeout_s: float | None = None) -> int:
        return self._call("load_experts", payloads, timeout_s=timeout_s)

    def get_expert_payload(self, key: Key, timeout_s: float | None = None) -> ExpertPayload:
        return self._call("get_expert_payload", *key, timeout_s=timeout_s)

    def weight_format(self, timeout_s: float | None = None) -> str:
        return self._call("weight_format", timeout_s=timeout_s)

    def stats(self, timeout_s: float | None = None) -> HostStats:
        return self._call("stats", timeout_s=timeout_s)

    def reset_stats(self, timeout_s: float | None = None) -> None:
        self._call("reset_stats", timeout_s=timeout_s)

    def kill(self) -> None:
        if self._dead:
            return
        self._dead = True
        self._dispatch.shutdown()
        self._control.shutdown()
        if self._stop is not None:
            self._stop()

    def close(self) -> None:
        self._dispatch.close()
        self._control.close()
