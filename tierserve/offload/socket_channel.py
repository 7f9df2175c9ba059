"""A direct TCP channel between the worker and one expert host: fused dispatch and control calls.

Why: decode makes one round trip per MoE layer and host, and a Ray actor call costs
~1.2 ms (1 host) to ~2 ms (2 hosts in parallel) on the 2-core test machine even for a
1-4 row payload (measured in benchmarks/offload.py). A Ray compiled graph
(``ray.dag`` ``experimental_compile``) was measured too: 0.12-0.6 ms when the actor is
on the caller's node (shared memory), but 1.3 ms (1 host) / 2.5-3.5 ms (2 hosts) across
nodes, where its channel is a raylet RPC push — no gain where the hosts actually are.
A plain TCP socket works across nodes and skips the scheduler, the object store and
pickling of the activations. The host (a plain process, tierserve.offload.host_process,
or the Ray actor of tierserve/actors/expert_host.py) opens a listening socket
(``start_server``: a daemon thread accepting connections, one more thread per accepted
connection) and the worker connects to it (``SocketChannel``). It is the only path to
a plain-process host, so the channel also carries the control calls: loading experts,
copying one out, the weight format, stats.

Authentication: the host holds a random 32-byte token (``start_server`` makes one, or
is given one); a connection must send it first and is served only if it matches
(``hmac.compare_digest``), else it is closed. The token reaches the worker through a
trusted path (the launcher's pipe to the child process, or an authenticated Ray call).

Wire format (little endian), one request and one reply per call:

* request: ``<B`` op, then for op 0 (compute) ``<iiiBB`` (layer, rows, hidden,
  len(np dtype name), len(torch dtype name)), the two names (ascii), ``x`` [rows,
  hidden] raw bytes, ``expert_ids`` [rows] int64; for op 1 (control) ``<Q`` n and n
  bytes of pickle of ``(method, args)``, ``method`` one of ``CONTROL_METHODS``;
* reply: ``<BQ`` (status 0 = ok / 1 = error, payload bytes), then the payload: the
  [rows, hidden] output in ``x``'s numpy dtype, the pickled control result, or a utf-8
  error message.

Control payloads (expert weights: numpy arrays and tierserve dataclasses; the torch
tensors inside a DFloat11 ``CodedExpert`` are pickled as numpy arrays plus their dtype
name, ``dumps``) are unpickled on both sides by a restricted unpickler that resolves
only ``numpy`` and ``tierserve`` names, so a peer cannot make the other side import or
call anything else.

The host runs the very same ``ExpertHostCore.compute`` on the received arrays, so the
outputs are bit-identical whichever transport carries them. Failure contract (worker
side): every read has the caller's deadline as socket timeout; a timeout, a closed
connection or an error reply raises :class:`ChannelError` (a ``HostCallError``), and
``HostPool`` then fails the host over. ``shutdown()`` wakes a read blocked on another
thread (used when the host is killed).
"""

from __future__ import annotations

import hmac
import io
import pickle
import secrets
import socket
import struct
import threading
import time

import numpy as np
import torch

from tierserve.errors import InvalidParameterError
from tierserve.offload.expert_weights import numpy_to_tensor, tensor_to_numpy
from tierserve.offload.transport import HostCallError

_OP = struct.Struct("<B")
_REQ = struct.Struct("<iiiBB")
_LEN = struct.Struct("<Q")
_REP = struct.Struct("<BQ")
OP_COMPUTE, OP_CONTROL = 0, 1
TOKEN_BYTES = 32
#: The host methods a control request may name (an ``ExpertHostCore`` has them all).
CONTROL_METHODS = frozenset({"load_experts", "get_expert_payload", "weight_format", "held", "stats",
                             "reset_stats"})


class ChannelError(HostCallError):
    """The channel to an expert host failed (timeout, closed connection, error reply)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "numpy" or module.startswith(("numpy.", "tierserve.")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed on the expert-host channel")


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return tensor_from_numpy, (tensor_to_numpy(obj.cpu()), str(obj.dtype).removeprefix("torch."))
        return NotImplemented


def tensor_from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A CPU tensor from its pickled numpy form (16-bit floats travel as their int16 bit patterns)."""
    return numpy_to_tensor(a, getattr(torch, dtype))


def dumps(obj) -> bytes:
    """Pickle a control payload, torch tensors as numpy arrays (module doc)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def loads(data: bytes):
    """Unpickle a control payload, resolving only numpy and tierserve names (module doc)."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


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
    """Worker side of one connection: ``send`` then ``recv`` (one outstanding call), or ``call``."""

    def __init__(self, address: tuple[str, int], connect_timeout_s: float, token: bytes):
        self.address = tuple(address)
        self.timeout_s = connect_timeout_s
        try:
            self.sock = socket.create_connection(self.address, timeout=connect_timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(token)
        except OSError as exc:
            raise ChannelError(f"connect to {self.address}: {exc}") from exc
        self._shape: tuple[int, int, np.dtype] | None = None

    def send(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str) -> None:
        x = np.ascontiguousarray(x)
        ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
        npname, tname = x.dtype.str.encode(), dtype.encode()
        head = _OP.pack(OP_COMPUTE) + _REQ.pack(layer, x.shape[0], x.shape[1], len(npname), len(tname))
        try:
            self.sock.settimeout(self.timeout_s)  # recv leaves the remaining deadline: a send must not inherit it
            self.sock.sendall(b"".join((head, npname, tname, x.tobytes(), ids.tobytes())))
        except OSError as exc:
            raise ChannelError(f"send to {self.address}: {exc}") from exc
        self._shape = (x.shape[0], x.shape[1], x.dtype)

    def recv(self, deadline: float) -> np.ndarray:
        """The reply to the last ``send``; ``deadline`` is a ``time.monotonic()`` instant."""
        if self._shape is None:
            raise ChannelError("recv without a pending send")
        rows, hidden, dt = self._shape
        self._shape = None
        return np.frombuffer(self._reply(deadline), dtype=dt).reshape(rows, hidden)

    def call(self, method: str, *args, timeout_s: float | None = None):
        """Run control ``method(*args)`` on the host and return its result (module doc)."""
        body = dumps((method, args))
        try:
            self.sock.settimeout(self.timeout_s if timeout_s is None else timeout_s)
            self.sock.sendall(_OP.pack(OP_CONTROL) + _LEN.pack(len(body)) + body)
        except OSError as exc:
            raise ChannelError(f"send to {self.address}: {exc}") from exc
        payload = self._reply(time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s))
        try:
            return loads(bytes(payload))
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise ChannelError(f"bad reply from {self.address}: {exc}") from exc

    def _reply(self, deadline: float) -> bytearray:
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            status, n = _REP.unpack(_recv_exact(self.sock, _REP.size))
            payload = _recv_exact(self.sock, n)
        except OSError as exc:  # socket.timeout is an OSError
            raise ChannelError(f"recv from {self.address}: {type(exc).__name__}") from exc
        if status != 0:
            raise ChannelError(f"host {self.address} failed: {bytes(payload).decode(errors='replace')}")
        return payload

    def shutdown(self) -> None:
        """Wake any read blocked on this connection (another thread's), then close it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _authenticated(conn: socket.socket, token: bytes) -> bool:
    try:
        conn.settimeout(10.0)
        return hmac.compare_digest(bytes(_recv_exact(conn, TOKEN_BYTES)), token)
    except (ChannelError, OSError):
        return False


def _answer(conn: socket.socket, host) -> bytes:
    """Read one request from ``conn`` and run it on ``host``; the reply bytes."""
    (op,) = _OP.unpack(_recv_exact(conn, _OP.size))
    if op == OP_COMPUTE:
        layer, rows, hidden, ln, lt = _REQ.unpack(_recv_exact(conn, _REQ.size))
        names = bytes(_recv_exact(conn, ln + lt)).decode()
        dt = np.dtype(names[:ln])
        x = np.frombuffer(_recv_exact(conn, rows * hidden * dt.itemsize), dtype=dt).reshape(rows, hidden)
        ids = np.frombuffer(_recv_exact(conn, rows * 8), dtype=np.int64)
        try:
            out = np.ascontiguousarray(host.compute(layer, x, ids, names[ln:]))
        except Exception as exc:  # reported to the worker, which fails this host over
            return _error(exc)
        return _REP.pack(0, out.nbytes) + out.tobytes()
    if op != OP_CONTROL:
        raise ChannelError(f"unknown op {op}")
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    try:
        method, args = loads(bytes(_recv_exact(conn, n)))
        if method not in CONTROL_METHODS:
            raise ValueError(f"unknown control method {method!r}")
        body = dumps(getattr(host, method)(*args))
    except ChannelError:
        raise
    except Exception as exc:
        return _error(exc)
    return _REP.pack(0, len(body)) + body


def _error(exc: Exception) -> bytes:
    msg = f"{type(exc).__name__}: {exc}".encode()
    return _REP.pack(1, len(msg)) + msg


def serve_connection(conn: socket.socket, host) -> None:
    """Answer requests on one authenticated connection until the worker closes it."""
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            try:
                reply = _answer(conn, host)
            except (ChannelError, OSError):
                return  # the worker closed the connection (or sent garbage)
            try:
                conn.sendall(reply)
            except OSError:
                return


def serve_channel(listener: socket.socket, host, token: bytes) -> None:
    """Accept connections for as long as ``listener`` is open; serve each one presenting ``token``."""
    with listener:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed
            if not _authenticated(conn, token):
                conn.close()
                continue
            threading.Thread(target=serve_connection, args=(conn, host), daemon=True,
                             name="expert-host-connection").start()


def open_listener(ip: str, port: int = 0) -> tuple[socket.socket, tuple[str, int]]:
    """A listening socket on ``ip`` (``port`` 0: any free port) and its address."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ip, port))
    listener.listen(8)
    return listener, listener.getsockname()


def start_server(ip: str, host, port: int = 0, token: bytes | None = None) -> tuple[str, int, str]:
    """Serve ``host`` (compute and ``CONTROL_METHODS``) on ``ip``; returns (ip, port, hex token)."""
    token = token if token is not None else secrets.token_bytes(TOKEN_BYTES)
    if len(token) != TOKEN_BYTES:
        raise InvalidParameterError("token", f"must be {TOKEN_BYTES} bytes, got {len(token)}")
    listener, address = open_listener(ip, port)
    threading.Thread(target=serve_channel, args=(listener, host, token), daemon=True,
                     name="expert-host-channel").start()
    return address[0], address[1], token.hex()
