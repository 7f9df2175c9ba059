"""The second cold path: a ring of spare expert slots on the worker, and the cost model choosing it.

**Cost model.** For a cold expert that ``n`` (token, slot) rows are routed to in one
layer and step, with ``B`` the expert's weight bytes:

    remote(n) = rtt_s + n * remote_token_s           # send rows, host computes, rows back
    fetch(n)  = B / bandwidth_Bps + n * local_token_s  # copy the weights into a spare slot, compute here

the expert is fetched into a spare slot when ``fetch(n) < remote(n)``, i.e. for many
tokens on one expert (prefill), and computed on its host otherwise (decode: n is 1-2).
A slot already holding the expert always wins (cost ``n * local_token_s``).
Defaults (used until ``CostModel.measure`` replaces them at startup): ``rtt_s`` =
1.1e-3 (the median actor round trip measured on the 2-core dev machine),
``bandwidth_Bps`` = 5e8 (a numpy array through Ray's object store: 16 MB in 13-49 ms),
``remote_token_s`` = ``local_token_s`` = 2e-5 (one token through a ~2 M-parameter
expert at ~10 GFLOP/s, plus the 4-byte/element row transfer for remote).
``measure(pool, key)`` (called by ``offload_from_config`` at start-up whenever spare
slots are configured; the benchmark's ``calibrated+cache`` row) times the real paths
to one cold expert: a ``fetch_expert`` of it (bandwidth: the expert's RAW bytes over the
time of the transfer plus, on a ``"dfloat11"`` host, the decode, so it is an effective
bandwidth in the raw bytes the dispatcher passes as ``B``); the median of 5 fused
dispatch round trips (``HostPool.submit``/``wait``: the transport decode uses, socket or
Ray) of 1 and of 64 rows to its host (``remote_token_s`` = the difference / 63,
``rtt_s`` = the 1-row time minus one row); the median of 5 local runs of the fetched
expert at 1 and 64 rows (``local_token_s`` likewise); rows in the expert's dtype.
On the 2-core dev machine (benchmarks/offload.py) it measures a remote row far
cheaper than a fetch (rtt ~0.2 ms over the socket, ~1e-2 s per raw expert fetched), so
the ring is chosen only for prefills of hundreds of rows per expert; a GPU worker,
whose local rows cost a hundredth of a host CPU's, crosses over much earlier.
tests/test_expert_cost_decision.py checks the dispatcher's decision against this formula
with the constants ``measure`` gives at start-up, on both sides of the crossover they imply.

**Ring.** ``capacity`` slots; which key is in flight, held, pinned or evicted (least recently
used first, never a pinned or in-flight key) is ``SlotLedger``'s bookkeeping
(tierserve.offload.slot_ledger). ``fetch(key, transport, prefetch=False)`` reserves a slot
(None when every slot is in flight or pinned: the caller sends the rows instead) and starts
a copy on a background thread (``ThreadPoolExecutor`` with one thread): ``fetch_expert(transport,
key)`` (tierserve.offload.expert_transit: one ``get_expert_payload`` call on the host's
transport; what crosses the wire is the host's at-rest form, raw arrays from a ``"raw"`` host,
the DFloat11-coded expert from a ``"dfloat11"`` host, decoded on this thread) then
``build_expert`` with the worker's linear backend, so a slot computes bit-identically to the
host. ``finish(key, future)`` waits for the copy and makes the slot readable; a failed copy
frees its slot and re-raises. A key is never readable before ``finish``: the dispatcher
(tierserve.offload.dispatch) finishes a layer's routed in-flight keys before planning the layer.
Counters: ``fills`` (copies finished), ``hits`` (reads of a held slot), ``fill_bytes`` (a
``TransitBytes``: the payload bytes of the fills as they crossed the wire, ``.wire``, and as
raw arrays, ``.raw``), ``prefetch`` (issued / used / wasted, tierserve.offload.prefetch).

**Overlap.** On the CPU a fetch started when a layer's routing is known overlaps the rest of
that layer's MoE (the network receive releases the GIL); a prefetch
(``OffloadConfig.prefetch = "previous_step"``) is started before the step's first layer and
overlaps every earlier layer. On a CUDA worker (``device``) the slots live in device memory:
the ring's thread copies each fetched expert's weights host-to-device through pinned buffers
on the ring's own copy stream and records an event there (``build_expert_on_stream``); it does
not wait. ``finish`` makes the consuming (current) stream wait for that event and records the
slot's tensors on it, so the compute stream is never blocked by the host: a prefetched
expert's copy overlaps the attention of every layer before it, and the consuming layer's
kernels are ordered after the copy. (A fetch decided inside layer L cannot overlap layer
L+1's attention: L's output needs it; such fetches pay off in prefills, where n is large.)
``close()`` stops the thread.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tierserve.errors import InvalidParameterError
from tierserve.offload.expert_transit import TransitBytes, fetch_expert
from tierserve.offload.expert_weights import build_expert, build_expert_on_stream, tensor_to_numpy
from tierserve.offload.host_pool import ExpertHostError
from tierserve.offload.slot_ledger import PrefetchCounters, SlotLedger

Key = tuple[int, int]


@dataclass(frozen=True)
class CostModel:
    rtt_s: float = 1.1e-3
    bandwidth_Bps: float = 5e8
    remote_token_s: float = 2e-5
    local_token_s: float = 2e-5

    def __post_init__(self) -> None:
        for name in ("rtt_s", "bandwidth_Bps", "remote_token_s", "local_token_s"):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(name, f"must be > 0, got {getattr(self, name)}")

    def remote_cost(self, n: int) -> float:
        return self.rtt_s + n * self.remote_token_s

    def fetch_cost(self, n: int, weight_bytes: int) -> float:
        return weight_bytes / self.bandwidth_Bps + n * self.local_token_s

    def prefer_fetch(self, n: int, weight_bytes: int) -> bool:
        return self.fetch_cost(n, weight_bytes) < self.remote_cost(n)

    @classmethod
    @torch.inference_mode()
    def measure(cls, pool, key: Key, repeats: int = 5) -> "CostModel":
        """Constants measured on the live dispatch path to ``key``'s owner (module doc)."""
        owner = pool.owner(key)
        if owner is None:
            raise InvalidParameterError("key", f"expert {key} has no live host to measure against")
        t0 = time.perf_counter()
        w = fetch_expert(pool.transport(owner), key, pool.timeout_s).weights
        bandwidth = w.nbytes / max(time.perf_counter() - t0, 1e-6)
        module = build_expert(w, pool.linear_backend, pool.device)
        hidden, dtype = w.gate_up.shape[1], getattr(torch, w.dtype)
        x1, x64 = torch.randn(1, hidden, dtype=dtype), torch.randn(64, hidden, dtype=dtype)
        remote1 = _remote_seconds(pool, owner, key, x1, repeats)
        remote64 = _remote_seconds(pool, owner, key, x64, repeats)
        x1, x64 = x1.to(pool.device), x64.to(pool.device)
        module(x64)
        local1, local64 = _local_seconds(module, x1, repeats), _local_seconds(module, x64, repeats)
        remote_token = max((remote64 - remote1) / 63, 1e-9)
        return cls(rtt_s=max(remote1 - remote_token, 1e-6), bandwidth_Bps=bandwidth, remote_token_s=remote_token,
                   local_token_s=max((local64 - local1) / 63, 1e-9))


def _remote_seconds(pool, owner: str, key: Key, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one fused-dispatch round trip of ``x``'s rows to expert ``key`` on ``owner``."""
    xs, ids = tensor_to_numpy(x), np.full(len(x), key[1], dtype=np.int64)
    dtype = str(x.dtype).removeprefix("torch.")
    times = []
    for _ in range(repeats + 1):  # the first call builds the host's module: not timed
        t0 = time.perf_counter()
        if pool.wait({owner: pool.submit(owner, key[0], xs, ids, dtype)}).get(owner) is None:
            raise ExpertHostError(f"expert host {owner} failed while the cost model measured it")
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _local_seconds(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``module(x)`` on the worker's device (waited for on CUDA)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SpareSlots:
    """Ring of ``capacity`` locally held cold experts, filled asynchronously (module doc); the states, pins
    and eviction order are ``SlotLedger``'s (tierserve.offload.slot_ledger)."""

    def __init__(self, capacity: int, linear_backend: str, device: torch.device | str = "cpu"):
        self.ledger = SlotLedger(capacity)
        self.capacity = capacity
        self.linear_backend = linear_backend
        self.device = torch.device(device)
        self._copy_stream = None  # CUDA: the stream the ring's host-to-device weight copies run on
        self._slots: dict[Key, torch.nn.Module] = {}
        self._pending: dict[Key, Future] = {}  # each yields (module, copy event or None, TransitBytes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spare-slots")
        self.hits = 0
        self.fills = 0
        self.fill_bytes = TransitBytes()

    def __contains__(self, key: Key) -> bool:
        return self.ledger.ready(key)

    def keys(self) -> list[Key]:
        """Readable keys, least recently used first."""
        return self.ledger.held()

    def in_flight(self) -> list[Key]:
        """The keys whose copy was started and not yet ``finish``-ed."""
        return list(self._pending)

    @property
    def prefetch(self) -> PrefetchCounters:
        return self.ledger.prefetch

    def free_slots(self) -> int:
        return self.ledger.free_slots()

    def get(self, key: Key) -> torch.nn.Module | None:
        if not self.ledger.ready(key):
            return None
        self.ledger.touch(key)
        self.hits += 1
        return self._slots[key]

    def fetch(self, key: Key, transport, prefetch: bool = False) -> Future | None:
        """Start copying ``key`` from the host behind ``transport`` into a slot (or join the copy in flight);
        pass the future to ``finish``. None when every slot is in flight or pinned (send the rows instead)."""
        if key in self._pending:
            return self._pending[key]
        evicted = self.ledger.reserve(key, prefetch)
        if evicted is None:
            return None
        for k in evicted:
            self._slots.pop(k, None)
        future = self._pool.submit(self._copy, key, transport)
        self._pending[key] = future
        return future

    def _copy(self, key: Key, transport):
        fetched = fetch_expert(transport, key, None)  # the transport's own timeout; finish() bounds the wait
        if self.device.type != "cuda":
            return build_expert(fetched.weights, self.linear_backend, self.device), None, fetched.bytes
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        module, done = build_expert_on_stream(fetched.weights, self.linear_backend, self.device, self._copy_stream)
        return module, done, fetched.bytes

    def finish(self, key: Key, future: Future, timeout_s: float) -> torch.nn.Module:
        """Wait for a fetch and make its slot readable; raises what the copy raised (the slot is freed). On
        CUDA the current stream waits for the copy's event: later kernels read the slot after it landed."""
        try:
            module, done, moved = future.result(timeout=timeout_s)
        except BaseException:
            self._pending.pop(key, None)
            self.ledger.cancel(key)
            raise
        self._pending.pop(key, None)
        if done is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(done)
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_cuda:
                    t.record_stream(consumer)  # allocated on the copy stream, read on this one
        self.ledger.complete(key)
        self._slots[key] = module
        self.fills += 1
        self.fill_bytes.merge(moved)
        return module

    def pending(self, layer: int) -> list[tuple[Key, Future]]:
        """The copies in flight for ``layer``."""
        return [(k, f) for k, f in self._pending.items() if k[0] == layer]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._slots.clear()
        self.ledger.clear()
