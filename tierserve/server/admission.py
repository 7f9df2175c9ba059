"""Worker admission: 429 at once for a request that meets a full replica, a wait for one that queued.

Why. LLMServer's ``max_ongoing_requests`` is its capacity + 1 (``max_num_seqs +
max_waiting_requests``, server/app.py) so that the worker itself sees the request
that overflows it and answers 429 (``QueueFullError``). That 429 returns at once and
frees the extra slot, so Serve sends its next queued request into the same full
replica, and the next: a queue that built up while no replica could take requests
(every replica dead and restarting, or still starting) drained as a burst of 429s
the moment a replica came back, which was busy with only the first ``capacity`` of them.

Rule (``AdmissionGate.enter(waited_s)``; ``waited_s``: seconds from the ingress's
call to the replica receiving it):

* a slot is free and nobody waits for one: admitted;
* full, and the request came within ``QUEUED_AFTER_S`` (0.5 s) of the call: 429 at
  once, as before (steady overload: Serve's queue is empty, the client retries after
  Retry-After);
* full, and it came later: it sat in Serve's queue, accepted by the service while no
  replica could take it. It waits for a slot, first come first served, at most
  ``QUEUED_WAIT_S`` (30 s), then gets the 429. While it waits it holds the extra slot,
  so Serve keeps the rest of its queue (bounded by ``max_queued_requests``, beyond
  which callers get 503) and sends the next request only when this one is admitted:
  the queue drains in order, as fast as the replica frees slots.

A finished request hands its slot to the first waiter (``leave``); a waiter whose
caller goes away gives up its place, or the slot it was just handed. ``waited_s`` is
measured on wall clocks (``time.time()`` at the ingress and at the replica, hosts of
one cluster): a clock skew above 0.5 s would make overflow requests wait (at most
30 s) instead of getting the immediate 429. Pure asyncio, no Ray.
"""

from __future__ import annotations

import asyncio
from collections import deque

#: A request that reaches the replica this long after the ingress's call had waited in Serve's queue.
QUEUED_AFTER_S = 0.5
#: The longest a queued request waits at a full replica for a slot before its 429.
QUEUED_WAIT_S = 30.0


class AdmissionGate:
    def __init__(self, capacity: int, queued_after_s: float = QUEUED_AFTER_S, max_wait_s: float = QUEUED_WAIT_S):
        self.capacity = capacity
        self.queued_after_s = queued_after_s
        self.max_wait_s = max_wait_s
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def enter(self, waited_s: float) -> bool:
        """Take a slot (True), or False: the caller answers 429 (module doc)."""
        if self.active < self.capacity and not self._waiters:
            self.active += 1
            return True
        if waited_s < self.queued_after_s:
            return False
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait({slot}, timeout=self.max_wait_s)
        except asyncio.CancelledError:
            self._give_up(slot)
            raise
        if slot.done():
            return True          # handed a slot by leave(); active already counts it
        self._give_up(slot)
        return False

    def leave(self) -> None:
        """Release a slot: to the first live waiter, else back to the pool."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(True)
                return
        self.active -= 1

    def _give_up(self, slot: asyncio.Future) -> None:
        if slot.done() and not slot.cancelled():
            self.leave()         # handed a slot just as it gave up: pass it on
            return
        slot.cancel()
        try:
            self._waiters.remove(slot)
        except ValueError:
            pass
