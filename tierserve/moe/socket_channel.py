"""A direct TCP channel between the worker and one ExpertHost: the fused-dispatch call without Ray's task path.

Why: decode makes one round trip per MoE layer and host, and a Ray actor call costs
~1.2 ms (1 host) to ~2 ms (2 hosts in parallel) on the 2-core test machine even for a
1-4 row payload (measured in benchmarks/offload.py). A Ray compiled graph
(``ray.dag`` ``experimental_compile``) was measured too: 0.12-0.6 ms when the actor is
on the caller's node (shared memory), but 1.3 ms (1 host) / 2.5-3.5 ms (2 hosts) across
nodes, where its channel is a raylet RPC push — no gain where the hosts actually are.
A plain TCP socket works across nodes and skips the scheduler, the object store and
pickling: the host opens a listening socket on its node IP (``ExpertHost.open_channel``,
a daemon thread that serves one connection) and the worker connects to it.
Authentication: ``open_channel`` also returns a random 32-byte token (it travels over
the authenticated Ray call); the worker sends it first, and the host serves only the
first connection that presents it (``hmac.compare_digest``), closing any other.

Wire format (little endian), one request and one reply per fused message:

* request: ``<iiiBB`` (layer, rows, hidden, len(np dtype name), len(torch dtype name)),
  the two names (ascii), ``x`` [rows, hidden] raw bytes, ``expert_ids`` [rows] int64;
* reply: ``<BQ`` (status 0 = ok / 1 = error, payload bytes), then the payload: the
  [rows, hidden] output in ``x``'s numpy dtype, or a utf-8 error message.

The host runs the very same ``ExpertHost.compute`` on the received arrays, so the
outputs are bit-identical to the Ray path. Failure contract (worker side): every read
has the caller's deadline as socket timeout; a timeout, a closed connection or an
error reply raises :class:`ChannelError`, and ``HostPool`` then fails the host over
exactly as for a failed Ray call (the Ray actor path stays the fallback and is used
for loading, spare-slot copies and stats).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct
import threading
import time

import numpy as np

from tierserve.errors import TierserveError

_REQ = struct.Struct("<iiiBB")
TOKEN_BYTES = 32
_REP = struct.Struct("<BQ")


class ChannelError(TierserveError):
    """The channel to an expert host failed (timeout, closed connection, error reply)."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


class SocketChannel:
    """Worker side of one host's channel: ``send`` then ``recv`` (one outstanding call at a time)."""

    def __init__(self, address: tuple[str, int], connect_timeout_s: float, token: bytes):
        self.address = address
        self.timeout_s = connect_timeout_s
        self.sock = socket.create_connection(address, timeout=connect_timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(token)
        self._shape: tuple[int, int, np.dtype] | None = None

    def send(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str) -> None:
        x = np.ascontiguousarray(x)
        ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
        npname, tname = x.dtype.str.encode(), dtype.encode()
        head = _REQ.pack(layer, x.shape[0], x.shape[1], len(npname), len(tname)) + npname + tname
        try:
            self.sock.settimeout(self.timeout_s)  # recv leaves the remaining deadline: a send must not inherit it
            self.sock.sendall(b"".join((head, x.tobytes(), ids.tobytes())))
        except OSError as exc:
            raise ChannelError(f"send to {self.address}: {exc}") from exc
        self._shape = (x.shape[0], x.shape[1], x.dtype)

    def recv(self, deadline: float) -> np.ndarray:
        """The reply to the last ``send``; ``deadline`` is a ``time.monotonic()`` instant."""
        if self._shape is None:
            raise ChannelError("recv without a pending send")
        rows, hidden, dt = self._shape
        self._shape = None
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            status, n = _REP.unpack(_recv_exact(self.sock, _REP.size))
            payload = _recv_exact(self.sock, n)
        except OSError as exc:  # socket.timeout is an OSError
            raise ChannelError(f"recv from {self.address}: {type(exc).__name__}") from exc
        if status != 0:
            raise ChannelError(f"host {self.address} failed: {bytes(payload).decode(errors='replace')}")
        return np.frombuffer(payload, dtype=dt).reshape(rows, hidden)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _accept_authenticated(listener: socket.socket, token: bytes) -> socket.socket:
    """The first connection that sends ``token``; others are closed."""
    with listener:
        while True:
            conn, _ = listener.accept()
            try:
                conn.settimeout(10.0)
                ok = hmac.compare_digest(bytes(_recv_exact(conn, TOKEN_BYTES)), token)
            except (ChannelError, OSError):
                ok = False
            if ok:
                conn.settimeout(None)
                return conn
            conn.close()


def serve_channel(listener: socket.socket, compute, token: bytes) -> None:
    """Host side (run in a daemon thread): accept the worker's connection, answer requests until it closes.

    ``compute(layer, x, expert_ids, dtype) -> np.ndarray`` is ``ExpertHost.compute``.
    """
    conn = _accept_authenticated(listener, token)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            try:
                layer, rows, hidden, ln, lt = _REQ.unpack(_recv_exact(conn, _REQ.size))
                names = bytes(_recv_exact(conn, ln + lt)).decode()
                dt = np.dtype(names[:ln])
                x = np.frombuffer(_recv_exact(conn, rows * hidden * dt.itemsize), dtype=dt).reshape(rows, hidden)
                ids = np.frombuffer(_recv_exact(conn, rows * 8), dtype=np.int64)
            except (ChannelError, OSError):
                return  # the worker closed the channel
            try:
                out = np.ascontiguousarray(compute(layer, x, ids, names[ln:]))
                reply = _REP.pack(0, out.nbytes) + out.tobytes()
            except Exception as exc:  # reported to the worker, which fails this host over
                msg = f"{type(exc).__name__}: {exc}".encode()
                reply = _REP.pack(1, len(msg)) + msg
            try:
                conn.sendall(reply)
            except OSError:
                return


def open_listener(ip: str) -> tuple[socket.socket, tuple[str, int]]:
    """A listening socket on ``ip`` (any free port) and its address."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((ip, 0))
    listener.listen(1)
    return listener, listener.getsockname()


def start_server(ip: str, compute) -> tuple[str, int, str]:
    """Serve ``compute`` on ``ip``; returns (ip, port, hex token the worker must present)."""
    listener, address = open_listener(ip)
    token = secrets.token_bytes(TOKEN_BYTES)
    threading.Thread(target=serve_channel, args=(listener, compute, token), daemon=True,
                     name="expert-host-channel").start()
    return address[0], address[1], token.hex()
