"""SlotLedger: the bookkeeping of the spare-slot ring -- which expert is where, what may be evicted, prefetch counts.

Pure Python over ``(layer, expert)`` keys (no torch); ``SpareSlots``
(tierserve.offload.spare_slots) holds the modules and the copies, this class
decides. A key is in one of two states:

* **in flight**: a copy into a reserved slot was started and has not completed
  (on CUDA: its copy-stream event has not been waited for by a consumer; on the
  CPU: its background fetch has not returned). An in-flight key is NOT
  readable (``ready`` is False) and is never evicted.
* **held**: ``complete(key)`` was called after the copy finished; readable,
  ordered least recently used first (``complete`` and ``touch`` move a key to
  the end).

Capacity: ``held + in flight <= capacity`` at all times; a copy takes its slot
when it starts (``reserve``), not when it lands, so a ring full of pending
copies refuses more instead of over-committing device memory.

Pins. ``need(key, layer)`` marks a key that layer ``layer`` of the current step
will read (a prefetch issued at the start of the step for a layer that has not
run yet). ``release_layer(layer)`` drops that layer's pins when the layer runs.
``reserve`` evicts the least recently used held key that is not pinned; if
every held key is pinned (or in flight) it returns None and changes nothing:
the caller sends the rows to the host instead (the ring never evicts a slot
that a pending layer still needs). ``free_slots()`` = capacity - in flight -
pinned held keys: how many reserves can succeed now.

Prefetch counters (``PrefetchCounters``): ``issued`` keys reserved with
``prefetch=True``; ``used`` prefetched keys read at least once (the first
``touch`` after their prefetch); ``wasted`` prefetched keys evicted, or whose
copy was cancelled, before any read. ``issued - used - wasted`` are still
outstanding (held or in flight, unread).

Tests: tests/test_slot_ledger.py (exact states, eviction order, pins, counters).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tierserve.errors import InvalidParameterError

Key = tuple[int, int]


@dataclass
class PrefetchCounters:
    """Prefetches issued, read at least once, and dropped unread (module doc)."""

    issued: int = 0
    used: int = 0
    wasted: int = 0


class SlotLedger:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise InvalidParameterError("spare_slots", f"must be >= 1, got {capacity}")
        self.capacity = capacity
        self._held: OrderedDict[Key, None] = OrderedDict()
        self._in_flight: set[Key] = set()
        self._pins: dict[Key, set[int]] = {}
        self._unread_prefetch: set[Key] = set()
        self.prefetch = PrefetchCounters()
        self.evictions = 0

    # ------------------------------------------------------------------ state
    def held(self) -> list[Key]:
        """Readable keys, least recently used first."""
        return list(self._held)

    def in_flight(self) -> list[Key]:
        return sorted(self._in_flight)

    def ready(self, key: Key) -> bool:
        return key in self._held

    def known(self, key: Key) -> bool:
        """Held or in flight: a copy of it exists or is under way."""
        return key in self._held or key in self._in_flight

    def pinned(self, key: Key) -> bool:
        return bool(self._pins.get(key))

    def free_slots(self) -> int:
        pinned_held = sum(1 for k in self._held if self.pinned(k))
        evictable = len(self._held) - pinned_held
        return self.capacity - len(self._in_flight) - len(self._held) + evictable

    # ------------------------------------------------------------ transitions
    def reserve(self, key: Key, prefetch: bool = False) -> list[Key] | None:
        """Take a slot for ``key``'s copy (evicting LRU unpinned held keys); the evicted keys, or None when no
        slot can be freed (nothing changed). ``key`` must be neither held nor in flight."""
        if self.known(key):
            raise ValueError(f"expert {key} is already {'held' if key in self._held else 'in flight'}")
        evicted: list[Key] = []
        if len(self._held) + len(self._in_flight) >= self.capacity:
            victim = next((k for k in self._held if not self.pinned(k)), None)
            if victim is None:
                return None
            self._drop(victim)
            evicted.append(victim)
        self._in_flight.add(key)
        if prefetch:
            self.prefetch.issued += 1
            self._unread_prefetch.add(key)
        return evicted

    def complete(self, key: Key) -> None:
        """``key``'s copy finished: it becomes readable, most recently used."""
        if key not in self._in_flight:
            raise ValueError(f"expert {key} has no copy in flight")
        self._in_flight.discard(key)
        self._held[key] = None

    def cancel(self, key: Key) -> None:
        """``key``'s copy failed: its slot is free again (a prefetch counts as wasted)."""
        if key not in self._in_flight:
            raise ValueError(f"expert {key} has no copy in flight")
        self._in_flight.discard(key)
        self._pins.pop(key, None)
        if key in self._unread_prefetch:
            self._unread_prefetch.discard(key)
            self.prefetch.wasted += 1

    def touch(self, key: Key) -> None:
        """A read of held ``key``: most recently used; the first read of a prefetched key counts it used."""
        if key not in self._held:
            raise ValueError(f"expert {key} is not readable (in flight: {key in self._in_flight})")
        self._held.move_to_end(key)
        if key in self._unread_prefetch:
            self._unread_prefetch.discard(key)
            self.prefetch.used += 1

    def need(self, key: Key, layer: int) -> None:
        """Pin ``key`` for ``layer`` of the current step (module doc)."""
        if not self.known(key):
            raise ValueError(f"expert {key} is neither held nor in flight")
        self._pins.setdefault(key, set()).add(layer)

    def release_layer(self, layer: int) -> None:
        for key in [k for k, layers in self._pins.items() if layer in layers]:
            self._pins[key].discard(layer)
            if not self._pins[key]:
                del self._pins[key]

    def _drop(self, key: Key) -> None:
        del self._held[key]
        self._pins.pop(key, None)
        self.evictions += 1
        if key in self._unread_prefetch:
            self._unread_prefetch.discard(key)
            self.prefetch.wasted += 1

    def clear(self) -> None:
        """Forget everything (the ring closed): unread prefetches count as wasted."""
        self.prefetch.wasted += len(self._unread_prefetch)
        self._unread_prefetch.clear()
        self._held.clear()
        self._in_flight.clear()
        self._pins.clear()
