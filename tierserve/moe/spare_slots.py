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
``bandwidth_Bps`` = 5e8 (a numpy array through the object store: 16 MB in 13-49 ms),
``remote_token_s`` = ``local_token_s`` = 2e-5 (one token through a ~2 M-parameter
expert at ~10 GFLOP/s, plus the 4-byte/element row transfer for remote).
``measure`` times a ping (rtt), ``get_expert`` of one expert (bandwidth) and a local
run of that expert at 1 and 64 rows (per-token cost; remote per-token = local +
2 x hidden x dtype bytes / bandwidth).

**Ring.** ``capacity`` slots, least-recently-used eviction (an ``OrderedDict``: a hit
moves the key to the end, an insert beyond capacity drops the front). ``fetch(key,
handle)`` starts a copy on a background thread (``ThreadPoolExecutor`` with one
thread): ``ray.get(host.get_expert(layer, e))`` then ``build_expert`` with the worker's
linear backend, so a slot computes bit-identically to the host. What overlaps on CPU:
the fetch is started as soon as the layer's routing is known, before the worker
issues the other hosts' fused calls and computes its resident experts; the copy
(network receive + object-store read, which release the GIL) runs while the main
thread computes the resident experts and waits for the hosts; the prepacking in
``build_expert`` competes for the same cores. Routing is only known per layer, so on a
CPU worker the copy cannot overlap the attention of the same layer; it overlaps the
rest of this layer's MoE and, once in the ring, every later step is a hit. ``close()``
stops the thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import ray
import torch

from tierserve.errors import InvalidParameterError
from tierserve.moe.expert_weights import ExpertWeights, build_expert

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
    def measure(cls, host, layer: int, expert: int, linear_backend: str, repeats: int = 5) -> "CostModel":
        """Constants measured against one live host holding ``(layer, expert)`` (module doc)."""
        ray.get(host.ping.remote())
        t0 = time.perf_counter()
        for _ in range(repeats):
            ray.get(host.ping.remote())
        rtt = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        w: ExpertWeights = ray.get(host.get_expert.remote(layer, expert))
        bandwidth = w.nbytes / max(time.perf_counter() - t0, 1e-6)
        module = build_expert(w, linear_backend)
        hidden = w.gate_up.shape[1]
        x1, x64 = torch.randn(1, hidden), torch.randn(64, hidden)
        module(x64)
        t0 = time.perf_counter()
        for _ in range(repeats):
            module(x1)
        t1 = time.perf_counter()
        for _ in range(repeats):
            module(x64)
        t64 = time.perf_counter()
        local = max(((t64 - t1) - (t1 - t0)) / (63 * repeats), 1e-9)
        remote = local + 2 * hidden * 4 / bandwidth
        return cls(rtt_s=max(rtt, 1e-6), bandwidth_Bps=bandwidth, remote_token_s=remote, local_token_s=local)


class SpareSlots:
    """LRU ring of ``capacity`` locally held cold experts, filled asynchronously (module doc)."""

    def __init__(self, capacity: int, linear_backend: str):
        if capacity < 1:
            raise InvalidParameterError("spare_slots", f"must be >= 1, got {capacity}")
        self.capacity = capacity
        self.linear_backend = linear_backend
        self._slots: OrderedDict[Key, torch.nn.Module] = OrderedDict()
        self._pending: dict[Key, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spare-slots")
        self.hits = 0
        self.fills = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._slots

    def keys(self) -> list[Key]:
        return list(self._slots)

    def get(self, key: Key) -> torch.nn.Module | None:
        module = self._slots.get(key)
        if module is not None:
            self._slots.move_to_end(key)
            self.hits += 1
        return module

    def fetch(self, key: Key, host) -> Future:
        """Start copying ``key`` from ``host`` (or join the copy in flight); the future yields the module."""
        if key in self._pending:
            return self._pending[key]
        future = self._pool.submit(self._copy, key, host)
        self._pending[key] = future
        return future

    def _copy(self, key: Key, host) -> torch.nn.Module:
        weights = ray.get(host.get_expert.remote(*key))
        return build_expert(weights, self.linear_backend)

    def finish(self, key: Key, future: Future, timeout_s: float) -> torch.nn.Module:
        """Wait for a fetch and insert it into the ring (evicting the LRU slot); raises what the copy raised."""
        try:
            module = future.result(timeout=timeout_s)
        finally:
            self._pending.pop(key, None)
        self._slots[key] = module
        self._slots.move_to_end(key)
        self.fills += 1
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)
        return module

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slots.clear()
