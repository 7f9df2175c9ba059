"""Which replica caches which KV block: a trie over chained block hashes.

Block hashes (``tierserve.cache.prefix_hash``) are chained: block ``i``'s
digest covers the whole token prefix up to and including block ``i``. A
request's hash list ``[h_0, h_1, ..., h_{n-1}]`` is therefore a path from the
root of a trie, and one digest names exactly one node (its parent is implied
by the digest), so the trie also keeps a flat ``digest -> node`` index.

Each node stores the set of replica ids that hold that block on their device
tier. Replicas report *diffs*, never guesses from text:

* ``add_chain(replica, hashes)``: the replica now holds every block of the
  chain ``hashes`` (a path from the root: ``hashes[0]`` is a first block).
  Re-reporting a chain is idempotent.
* ``evict(replica, hashes)``: the replica dropped these blocks (any order, any
  subset; unknown digests are ignored because an eviction may race a replica
  restart).
* ``drop_replica(replica)``: the replica is gone; forget all it held.

Nodes held by no replica and with no children are pruned immediately, so the
trie never holds a block nobody caches.

``longest_match(hashes)`` walks the request's path from the root and returns,
for every replica holding at least the first block, the number of *leading*
blocks it holds contiguously (``matched_blocks``). A replica holding blocks 0,
1 and 3 of a request matches 2: a gap stops reuse, because prefix caching can
only skip a contiguous prefix. Cost: O(path length x replicas alive on it).

Optional per-replica cap (``max_blocks_per_replica``, default None = no cap):
the tree then keeps at most that many blocks per replica, evicting the
replica's least recently reported block first. ``add_chain`` touches a chain
leaf-first, so within one chain the root is the most recent and the deepest
block the least recent: the cap trims chains from their tails and never cuts a
prefix out from under its own descendants' match.

Tests (tests/test_prefix_tree.py) check exact match counts for hand-built
chains, gaps, eviction, pruning, the LRU cap order, and compare
``longest_match`` with a brute-force reference over random diffs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tierserve.cache.prefix_hash import HASH_BYTES
from tierserve.errors import InvalidParameterError


@dataclass(eq=False)
class _Node:
    digest: bytes | None
    parent: _Node | None
    children: dict[bytes, _Node] = field(default_factory=dict)
    replicas: set[str] = field(default_factory=set)


class PrefixTree:
    """Exact map from chained block hashes to the replicas that cache them."""

    def __init__(self, max_blocks_per_replica: int | None = None):
        if max_blocks_per_replica is not None and max_blocks_per_replica < 1:
            raise InvalidParameterError(
                "max_blocks_per_replica", f"must be >= 1 or None, got {max_blocks_per_replica}")
        self.max_blocks_per_replica = max_blocks_per_replica
        self._root = _Node(digest=None, parent=None)
        self._index: dict[bytes, _Node] = {}
        # replica -> its blocks, least recently reported first.
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    # ----------------------------------------------------------------- diffs
    def add_chain(self, replica_id: str, hashes: Sequence[bytes]) -> list[bytes]:
        """Record that ``replica_id`` holds every block of the chain ``hashes``.

        Returns the digests the per-replica cap evicted as a consequence
        (empty without a cap).
        """
        _check_replica(replica_id)
        self._check_chain(hashes)
        node = self._root
        path: list[_Node] = []
        for digest in hashes:
            child = node.children.get(digest)
            if child is None:
                child = _Node(digest=digest, parent=node)
                node.children[digest] = child
                self._index[digest] = child
            path.append(child)
            node = child
        held = self._held.setdefault(replica_id, OrderedDict())
        for child in reversed(path):  # leaf first: the root ends up most recent
            child.replicas.add(replica_id)
            held[child.digest] = None
            held.move_to_end(child.digest)
        if not held:
            del self._held[replica_id]
        return self._enforce_cap(replica_id)

    def evict(self, replica_id: str, hashes: Iterable[bytes]) -> int:
        """Record that ``replica_id`` dropped ``hashes``; returns how many it held."""
        _check_replica(replica_id)
        held = self._held.get(replica_id)
        if held is None:
            return 0
        removed = 0
        for digest in hashes:
            if digest in held:
                del held[digest]
                self._unlink(replica_id, self._index[digest])
                removed += 1
        if not held:
            del self._held[replica_id]
        return removed

    def drop_replica(self, replica_id: str) -> int:
        """Forget everything ``replica_id`` held; returns the number of blocks."""
        held = self._held.pop(replica_id, None)
        if held is None:
            return 0
        for digest in held:
            self._unlink(replica_id, self._index[digest])
        return len(held)

    # --------------------------------------------------------------- queries
    def longest_match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """For each replica, how many leading blocks of ``hashes`` it holds (replicas with 0 omitted)."""
        result: dict[str, int] = {}
        node = self._root
        alive: set[str] | None = None
        depth = 0
        for digest in hashes:
            child = node.children.get(digest)
            if child is None:
                break
            still = set(child.replicas) if alive is None else alive & child.replicas
            if alive is not None:
                for gone in alive - still:
                    result[gone] = depth
            alive = still
            if not alive:
                break
            node = child
            depth += 1
        for replica in alive or ():
            result[replica] = depth
        return result

    def replicas(self) -> list[str]:
        """Replica ids that hold at least one block, sorted."""
        return sorted(self._held)

    def num_blocks(self, replica_id: str | None = None) -> int:
        """Blocks held by ``replica_id``, or distinct blocks in the tree when None."""
        if replica_id is None:
            return len(self._index)
        return len(self._held.get(replica_id, ()))

    def holders(self, digest: bytes) -> frozenset[str]:
        """Replicas holding the block ``digest`` (empty if unknown)."""
        node = self._index.get(digest)
        return frozenset(node.replicas) if node is not None else frozenset()

    def blocks_of(self, replica_id: str) -> list[bytes]:
        """The blocks ``replica_id`` holds, least recently reported first."""
        return list(self._held.get(replica_id, ()))

    # -------------------------------------------------------------- internal
    def _check_chain(self, hashes: Sequence[bytes]) -> None:
        """Validate before mutating, so a bad chain leaves the tree untouched."""
        parent: bytes | None = None
        for i, digest in enumerate(hashes):
            _check_digest(digest, i)
            node = self._index.get(digest)
            if node is not None and node.parent.digest != parent:
                raise InvalidParameterError(
                    "hashes", f"block {i} is already in the tree under a different parent; "
                              "a chain must be a path from a first block (parent SEED)")
            parent = digest

    def _enforce_cap(self, replica_id: str) -> list[bytes]:
        cap = self.max_blocks_per_replica
        held = self._held.get(replica_id)
        if cap is None or held is None or len(held) <= cap:
            return []
        evicted = []
        while len(held) > cap:
            digest, _ = held.popitem(last=False)
            self._unlink(replica_id, self._index[digest])
            evicted.append(digest)
        return evicted

    def _unlink(self, replica_id: str, node: _Node) -> None:
        node.replicas.discard(replica_id)
        while node.parent is not None and not node.replicas and not node.children:
            parent = node.parent
            del parent.children[node.digest]
            del self._index[node.digest]
            node = parent


def _check_replica(replica_id: str) -> None:
    if not isinstance(replica_id, str) or not replica_id:
        raise InvalidParameterError("replica_id", f"must be a non-empty str, got {replica_id!r}")


def _check_digest(digest: bytes, position: int) -> None:
    if not isinstance(digest, bytes) or len(digest) != HASH_BYTES:
        size = len(digest) if isinstance(digest, (bytes, bytearray)) else type(digest).__name__
        raise InvalidParameterError(
            "hashes", f"block {position} must be a {HASH_BYTES}-byte block hash, got {size}")
