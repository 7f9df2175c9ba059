"""Which experts a worker holds at each step: static hot set, LRU, and prefetch from the previous step.

Pure bookkeeping over ints (no torch), replayed over a routing trace
(tierserve/offload/routing_trace.py). Per MoE layer the worker holds at most
``capacity`` experts; a step is one token (the trace's rows in order: text
order, so consecutive rows are consecutive tokens of one sequence). A routed
(token, slot) assignment whose expert is not held when the step starts is a
*cold hit* (it must be sent to a host or fetched). Policies, per layer:

- ``static``: the ``capacity`` experts with the highest counts on the
  calibration rows (ties to the lower id), never changed;
- ``lru``: starts as the static set; after each step the step's experts are
  inserted (most recent last) and the least recently used evicted down to
  ``capacity``: what a spare-slot ring does when every cold expert is fetched;
- ``prefetch``: before each step the held set is the previous step's experts
  (temporal locality: a token's experts predict the next token's), filled up
  to ``capacity`` with the static ranking; the previous step's experts beyond
  ``capacity`` keep their static order. The first step holds the static set.

``cold_hit_rate(trace, capacity, policy, calib, evaluate)``: the cold hits
over all assignments of the ``evaluate`` rows (a range of row indices), with
the static ranking from the ``calib`` rows; summed over layers. Tests:
tests/test_residency_policy.py (hand-worked sequences); measured on the
recorded trace by benchmarks/residency_policy.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from tierserve.errors import InvalidParameterError

if TYPE_CHECKING:  # only its ``layers``/``num_experts`` are read: this module stays torch-free
    from tierserve.offload.routing_trace import RoutingTrace

POLICIES = ("static", "lru", "prefetch", "ring")


def static_ranking(rows: list[list[int]], num_experts: int) -> list[int]:
    counts = [0] * num_experts
    for row in rows:
        for e in row:
            counts[e] += 1
    return sorted(range(num_experts), key=lambda e: (-counts[e], e))


def layer_cold_hits(rows: list[list[int]], ranking: list[int], capacity: int, policy: str) -> int:
    """Cold hits of one layer's ``rows`` (one step each) under ``policy`` (module doc)."""
    if policy not in POLICIES:
        raise InvalidParameterError("policy", f"must be one of {POLICIES}, got {policy!r}")
    if policy == "ring":
        return _ring_cold_hits(rows, ranking, capacity)
    static = ranking[:capacity]
    held = set(static)
    lru: OrderedDict[int, None] = OrderedDict((e, None) for e in reversed(static))
    cold = 0
    prev: list[int] | None = None
    for row in rows:
        if policy == "prefetch" and prev is not None:
            wanted = list(dict.fromkeys(sorted(prev, key=ranking.index) + ranking))
            held = set(wanted[:capacity])
        cold += sum(1 for e in row if e not in held)
        if policy == "lru":
            for e in row:
                lru.pop(e, None)
                lru[e] = None
            while len(lru) > capacity:
                lru.popitem(last=False)
            held = set(lru)
        prev = row
    return cold


def _ring_cold_hits(rows: list[list[int]], ranking: list[int], capacity: int) -> int:
    """Cold hits of the ``ring`` policy (module doc)."""
    r = min(len(rows[0]) if rows else 0, capacity // 2)
    resident = set(ranking[:capacity - r])
    ring: OrderedDict[int, None] = OrderedDict()
    cold = 0
    prev: list[int] | None = None
    for row in rows:
        if prev is not None and r:
            wanted = sorted({e for e in prev if e not in resident}, key=lambda e: (-prev.count(e), e))[:r]
            for e in wanted:
                ring.pop(e, None)
                ring[e] = None
            while len(ring) > r:
                ring.pop(next(e for e in ring if e not in wanted))
        cold += sum(1 for e in row if e not in resident and e not in ring)
        for e in row:
            if e in ring:
                ring.move_to_end(e)
        prev = row
    return cold


def cold_hit_rate(trace: "RoutingTrace", capacity: int, policy: str, calib: range, evaluate: range) -> float:
    if not 0 <= capacity <= trace.num_experts:
        raise InvalidParameterError("capacity", f"must be in [0, {trace.num_experts}], got {capacity}")
    cold = total = 0
    for rows in trace.layers:
        ranking = static_ranking([rows[i] for i in calib], trace.num_experts)
        steps = [rows[i] for i in evaluate]
        cold += layer_cold_hits(steps, ranking, capacity, policy)
        total += sum(len(r) for r in steps)
    return cold / max(total, 1)
