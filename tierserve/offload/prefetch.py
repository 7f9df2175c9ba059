"""Runtime predictive prefetch of cold experts into the spare-slot ring, from the previous step's routing.

Temporal locality: the experts a decode step routes to predict the next step's
(benchmarks/residency_policy.py measures it on the recorded routing trace; the
simulated ``prefetch`` policy of tierserve/offload/residency_policy.py is this
rule without a ring). Policy ``"previous_step"`` (``OffloadConfig.prefetch``;
``"none"`` turns it off): at the start of a decode step (every scheduled
request past its prompt; after a prefill the previous routing is the prompt's,
a poor predictor), before the first layer runs:

    for layer j ascending (the first layer is needed first),
      for the experts e the previous step routed to in layer j, by the number of
      rows it sent them (most first, then ascending id):
        skip e if it is resident, has no live host (failed over to the worker),
             or is already in flight;
    pin every candidate already held in the ring for its layer (not evicted before
    that layer runs; a held key costs no copy, so these go first);
    then, in candidate order, while the ring has a free slot (``SlotLedger.free_slots``
    minus the new pins): start the copy (``reserve(prefetch=True)``), pin it for its layer.

So at most ``capacity`` keys are in flight or pinned, prefetches never evict a
key an earlier-planned layer of the same step needs, and the copies of layer
``j`` overlap the attention and MoE of layers ``< j`` (and on CUDA layer ``j``'s
own attention: the copy runs on the ring's copy stream, tierserve/offload/spare_slots.py).
When layer ``j`` runs it waits for its routed keys still in flight (a prefetched
expert is never read before its copy completed) and releases its pins.
Counters: ``SlotLedger.prefetch`` (issued / used / wasted).

``plan_prefetch`` is pure over ints (no torch); tests: tests/test_prefetch.py (exact plans)
and tests/test_prefetch_engine.py (engine outputs with prefetch equal prefetch off, bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from tierserve.config import PREFETCH_POLICIES  # noqa: F401  (the policies, re-exported)
from tierserve.offload.slot_ledger import Key, SlotLedger


def plan_prefetch(previous: Mapping[int, Mapping[int, int]], resident: Mapping[int, Collection[int]],
                  has_owner: Callable[[Key], bool], ledger: SlotLedger) -> tuple[list[Key], list[Key]]:
    """(keys to copy now, keys already held to pin), in plan order (module doc); ``previous``: layer ->
    expert id -> rows routed to it in the previous step. Changes nothing in ``ledger``."""
    candidates: list[Key] = []
    for layer in sorted(previous):
        rows = previous[layer]
        for e in sorted(rows, key=lambda e: (-rows[e], e)):
            key = (layer, e)
            if (e in resident.get(layer, ()) or (ledger.known(key) and not ledger.ready(key))
                    or not has_owner(key)):
                continue
            candidates.append(key)
    pin = [k for k in candidates if ledger.ready(k) and not ledger.pinned(k)]
    free = ledger.free_slots() - len(pin)  # a pinned held key is no longer evictable
    fetch = [k for k in candidates if not ledger.ready(k)][:max(free, 0)]
    return fetch, pin
