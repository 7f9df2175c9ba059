"""Turn a block pool's cache events into prefix-tree diffs (chains added, hashes evicted).

The pool logs ``("cached", hash, parent)`` and ``("evicted", hash, None)``
in order (``BlockPool.record_events``). ``CacheMirror`` keeps, on the worker
side:

* ``parent``: hash -> parent hash of every block the pool caches now;
* ``reported``: the hashes the tree actor believes this replica holds;
* ``dirty``: hashes touched since the last report (plus cached blocks not
  yet reportable, see below).

``diff()`` returns what changed since the last call, O(dirty + chain walks):
evicted = dirty hashes reported but no longer cached; added = dirty hashes
cached but not reported. The tree wants each addition as a chain from a
first block (parent None), so for every *leaf* of the added set (an added
hash that is not the parent of another added hash) the chain is rebuilt by
walking ``parent`` up to the root. A block whose ancestor is no longer cached
cannot be matched by any request (prefix reuse stops at the gap), so it is
held back in ``dirty`` and reported if its ancestors come back, or dropped
when it is evicted itself. A hash cached and evicted between two reports
never reaches the tree; one evicted and re-cached stays reported.
``resync()`` starts over (the tree actor died and was recreated empty): the
next diff adds every cached block again.

``TierMirror`` does the same for the lower KV tiers (app with ``kv_tiers``),
producing a ``TierDiff`` (routing/tier_index.py) that travels in the same
``report`` call as ``tiers=``:

* dram / disk: ``diff(snapshots, ...)`` takes the chunk keys each local tier
  holds *now* (``TierHoldings.held`` from ``KVTierConnector.holdings()``,
  cache/tiers/connector.py, read from LMCache's own index, so LRU evictions
  show up) and reports the set difference with what it reported before:
  added = now - reported, evicted = reported - now.
* redis (shared): the connector's drained events (``TierHoldings.shared_events``:
  the last event per key), keys it put into, found in or loaded from Redis
  (added) and keys Redis did not have while it was up (evicted).

A ``TierMirror`` diff is committed by ``ack()`` once the tree actor accepted
the report; an unacknowledged (failed) report is re-sent by the next diff.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tierserve.routing.tier_index import SHARED_TIER, TierDiff


class CacheMirror:
    def __init__(self) -> None:
        self.parent: dict[bytes, bytes | None] = {}
        self.reported: set[bytes] = set()
        self.dirty: set[bytes] = set()

    def apply(self, events: Iterable[tuple[str, bytes, bytes | None]]) -> None:
        for kind, h, parent in events:
            if kind == "cached":
                self.parent[h] = parent
            elif kind == "evicted":
                self.parent.pop(h, None)
            else:
                raise ValueError(f"unknown cache event {kind!r}")
            self.dirty.add(h)

    def resync(self) -> None:
        """Forget what was reported: the next ``diff`` adds every block cached now (a new, empty tree actor)."""
        self.reported.clear()
        self.dirty = set(self.parent)

    def diff(self) -> tuple[list[list[bytes]], list[bytes]]:
        """(chains to add, hashes to evict) since the last call; marks them reported."""
        evicted = [h for h in self.dirty if h in self.reported and h not in self.parent]
        added = {h for h in self.dirty if h in self.parent and h not in self.reported}
        inner = {self.parent[h] for h in added}
        chains: list[list[bytes]] = []
        for leaf in added - inner:
            chain = self._chain(leaf)
            if chain is not None:
                chains.append(chain)
                self.reported.update(chain)
        self.reported.difference_update(evicted)
        self.dirty = {h for h in added if h not in self.reported}
        return chains, evicted

    def _chain(self, leaf: bytes) -> list[bytes] | None:
        chain, h = [], leaf
        while h is not None:
            if h not in self.parent:
                return None
            chain.append(h)
            h = self.parent[h]
        chain.reverse()
        return chain


class TierMirror:
    """Lower-tier chunk keys reported so far, per local tier; ``diff`` returns the next ``TierDiff``.

    Two-phase: ``diff`` computes the change against what was last *acknowledged*
    and ``ack`` (after the tree actor accepted the report) commits it. A report
    that failed is simply not acknowledged, so the next ``diff`` sends its
    changes again (applying a diff twice is idempotent) and keeps its Redis
    events (merged, the newer event per key wins).
    """

    def __init__(self, chunk_blocks: int) -> None:
        self.chunk_blocks = chunk_blocks
        self.reported: dict[str, set[bytes]] = {}
        self._redis: dict[bytes, bool] = {}
        self._pending: dict[str, set[bytes]] | None = None

    def diff(self, snapshots: Mapping[str, Iterable[bytes]],
             redis_events: Mapping[bytes, bool] | None = None) -> TierDiff | None:
        """Changes since the last acknowledged report (None when nothing changed)."""
        added: dict[str, list[bytes]] = {}
        evicted: dict[str, list[bytes]] = {}
        pending: dict[str, set[bytes]] = {}
        for tier, keys in snapshots.items():
            now = set(keys)
            before = self.reported.get(tier, set())
            if now - before:
                added[tier] = sorted(now - before)
            if before - now:
                evicted[tier] = sorted(before - now)
            pending[tier] = now
        for key, held in (redis_events or {}).items():
            self._redis.pop(key, None)
            self._redis[key] = held
        held = [k for k, v in self._redis.items() if v]
        missing = [k for k, v in self._redis.items() if not v]
        if held:
            added[SHARED_TIER] = held
        if missing:
            evicted[SHARED_TIER] = missing
        self._pending = pending
        diff = TierDiff(self.chunk_blocks, added, evicted)
        return None if diff.empty() else diff

    def ack(self) -> None:
        """The last ``diff`` reached the tree: commit it."""
        if self._pending is not None:
            self.reported.update(self._pending)
            self._pending = None
        self._redis.clear()
