"""StoreLedger: asynchronous KV chunk stores in flight, and the rule that a chunk is readable only once stored.

Pure bookkeeping over chunk keys (no torch). A store has two halves
(connector.py): the chunk's pages are copied out of the device into a host
buffer (on CUDA: device-to-host on a side stream, with an event; the step
does not wait for it), and, once that copy has completed, the record is
written and put into the tiers. Between the two the chunk is **pending**.

Rules:

* ``issue(key, ticket)`` starts a pending store; a key already pending is
  refused (False), so a chunk is never copied twice at once.
* ``complete(key)`` ends it and returns the ticket (the caller writes the
  record into the tiers). Only the owner of the ticket knows whether its copy
  completed (an event, or nothing on the CPU); the ledger keeps the order.
* ``pending(key)``: a pending chunk is not readable from any tier yet. The
  connector's lookup, finding a pending key, first waits for that store and
  completes it, then reads it (so a hit never sees a half-written chunk and
  never misses a chunk only because its copy was still running).
* ``oldest()``: pending keys in issue order (copies on one stream complete in
  that order; the connector completes a prefix of them without waiting).

Counters: ``issued``, ``completed``, ``max_pending`` (the most stores in flight
at once). Tests: tests/test_store_ledger.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class StoreLedger(Generic[T]):
    def __init__(self) -> None:
        self._pending: OrderedDict[bytes, T] = OrderedDict()
        self.issued = 0
        self.completed = 0
        self.max_pending = 0

    def issue(self, key: bytes, ticket: T) -> bool:
        if key in self._pending:
            return False
        self._pending[key] = ticket
        self.issued += 1
        self.max_pending = max(self.max_pending, len(self._pending))
        return True

    def pending(self, key: bytes) -> bool:
        return key in self._pending

    def ticket(self, key: bytes) -> T:
        return self._pending[key]

    def oldest(self) -> list[bytes]:
        return list(self._pending)

    def complete(self, key: bytes) -> T:
        if key not in self._pending:
            raise ValueError(f"chunk {key.hex()[:16]} has no store in flight")
        self.completed += 1
        return self._pending.pop(key)

    def __len__(self) -> int:
        return len(self._pending)
