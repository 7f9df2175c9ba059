"""SlotLedger (tierserve/offload/slot_ledger.py) and plan_prefetch (tierserve/offload/prefetch.py): exact states.

Hand-worked sequences: which key is readable when (never before its copy completed), which key is evicted
(least recently used, never pinned or in flight), when a reserve is refused, and the prefetch counters;
then the prefetch plan for a previous step's routing (order, skips, ring capacity, pins).
"""

from __future__ import annotations

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.offload.prefetch import plan_prefetch
from tierserve.offload.slot_ledger import SlotLedger


def test_a_key_is_readable_only_after_its_copy_completed():
    ring = SlotLedger(2)
    assert ring.reserve((0, 5)) == []
    assert not ring.ready((0, 5)) and ring.known((0, 5)) and ring.in_flight() == [(0, 5)]
    with pytest.raises(ValueError, match="not readable"):
        ring.touch((0, 5))
    with pytest.raises(ValueError, match="already in flight"):
        ring.reserve((0, 5))
    ring.complete((0, 5))
    assert ring.ready((0, 5)) and ring.held() == [(0, 5)] and ring.in_flight() == []
    with pytest.raises(ValueError, match="no copy in flight"):
        ring.complete((0, 5))


def test_lru_eviction_skips_pinned_and_in_flight_keys_and_refuses_when_nothing_is_free():
    ring = SlotLedger(3)
    for key in [(0, 1), (0, 2), (1, 3)]:
        ring.reserve(key)
        ring.complete(key)
    ring.touch((0, 1))  # LRU order now (0,2), (1,3), (0,1)
    assert ring.held() == [(0, 2), (1, 3), (0, 1)] and ring.free_slots() == 3
    ring.need((0, 2), layer=0)
    assert ring.free_slots() == 2
    assert ring.reserve((1, 7)) == [(1, 3)]  # (0,2) is older but pinned for layer 0
    assert ring.held() == [(0, 2), (0, 1)] and ring.in_flight() == [(1, 7)] and ring.free_slots() == 1
    assert ring.reserve((1, 8)) == [(0, 1)]
    assert ring.free_slots() == 0
    assert ring.reserve((1, 9)) is None  # (0,2) pinned, (1,7) and (1,8) in flight: nothing may go
    assert ring.held() == [(0, 2)] and ring.in_flight() == [(1, 7), (1, 8)] and ring.evictions == 2
    ring.release_layer(0)
    assert ring.reserve((1, 9)) == [(0, 2)]
    assert ring.held() == [] and ring.in_flight() == [(1, 7), (1, 8), (1, 9)]


def test_pins_of_several_layers_release_one_layer_at_a_time():
    ring = SlotLedger(1)
    ring.reserve((2, 4))
    ring.complete((2, 4))
    ring.need((2, 4), 2)
    ring.need((2, 4), 3)
    ring.release_layer(2)
    assert ring.pinned((2, 4)) and ring.reserve((0, 0)) is None
    ring.release_layer(3)
    assert not ring.pinned((2, 4)) and ring.reserve((0, 0)) == [(2, 4)]
    with pytest.raises(ValueError, match="neither held nor in flight"):
        ring.need((5, 5), 5)


def test_prefetch_counters_issued_used_wasted():
    ring = SlotLedger(2)
    ring.reserve((0, 1), prefetch=True)
    ring.reserve((0, 2), prefetch=True)
    ring.complete((0, 1))
    ring.complete((0, 2))
    ring.touch((0, 1))
    ring.touch((0, 1))  # a second read is not a second use
    assert (ring.prefetch.issued, ring.prefetch.used, ring.prefetch.wasted) == (2, 1, 0)
    assert ring.reserve((0, 3)) == [(0, 2)]  # LRU: (0,2) was never read -> wasted
    assert (ring.prefetch.issued, ring.prefetch.used, ring.prefetch.wasted) == (2, 1, 1)
    ring.cancel((0, 3))  # a demand fetch that failed: not a prefetch, nothing counted
    ring.reserve((0, 4), prefetch=True)
    ring.cancel((0, 4))  # a prefetch whose copy failed: wasted, its slot free again
    assert (ring.prefetch.issued, ring.prefetch.used, ring.prefetch.wasted) == (3, 1, 2)
    assert ring.held() == [(0, 1)] and ring.in_flight() == [] and ring.free_slots() == 2
    ring.reserve((1, 1), prefetch=True)
    ring.complete((1, 1))
    ring.clear()
    assert (ring.prefetch.issued, ring.prefetch.used, ring.prefetch.wasted) == (4, 1, 3)


def test_capacity_is_checked():
    with pytest.raises(InvalidParameterError, match="spare_slots"):
        SlotLedger(0)


def test_prefetch_plan_order_skips_and_capacity():
    ring = SlotLedger(3)
    ring.reserve((1, 6))
    ring.complete((1, 6))  # held: pinned, not copied again
    ring.reserve((0, 9))  # in flight: skipped
    previous = {1: {6: 1, 2: 3, 5: 3}, 0: {4: 1, 0: 2, 9: 1, 7: 5}}
    resident = {0: {0}, 1: set()}
    dead = {(0, 4)}  # its host died: computed on the worker, nothing to copy
    fetch, pin = plan_prefetch(previous, resident, lambda key: key not in dead, ring)
    # free slots: 3 - 1 in flight = 2; the pin of held (1, 6) comes first and takes one; (0, 7) has most rows
    assert fetch == [(0, 7)] and pin == [(1, 6)]
    assert ring.in_flight() == [(0, 9)] and not ring.pinned((1, 6))  # planning changes nothing


def test_prefetch_plan_fills_the_free_slots_in_layer_then_row_order():
    ring = SlotLedger(4)
    previous = {1: {3: 2, 1: 2, 8: 1}, 0: {5: 1, 2: 1}}
    fetch, pin = plan_prefetch(previous, {0: set(), 1: set()}, lambda key: True, ring)
    assert fetch == [(0, 2), (0, 5), (1, 1), (1, 3)] and pin == []


def test_prefetch_plan_is_empty_when_every_slot_is_pinned():
    ring = SlotLedger(1)
    ring.reserve((0, 1))
    ring.complete((0, 1))
    ring.need((0, 1), 0)
    assert plan_prefetch({0: {2: 1}}, {}, lambda key: True, ring) == ([], [])
