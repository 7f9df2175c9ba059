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
"""

from __future__ import annotations

from collections.abc import Iterable


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
