"""BlockPool: reference-counted KV blocks with an LRU free queue and a prefix-hash index.

Blocks are the ids ``0 .. num_blocks-1`` (all usable). Each block has a
reference count (how many requests' block tables hold it) and, once its
tokens are all known, may be *cached*: registered under its chained prefix
hash (see prefix_hash.py) so that later requests can reuse it.

Free queue: every block whose ref count is 0, in LRU order -- never-used
blocks first (ascending id), then freed blocks in the order they were freed.
``allocate`` takes from the head. A freed cached block keeps its hash while it
waits in the queue, so a prefix hit can *revive* it: ``touch`` removes it from
the queue in O(1) (the queue is an insertion-ordered dict). A cached block is
*evicted* (its hash mapping dropped, ``num_evictions`` += 1) only when
``allocate`` hands it out again. Callers free a request's blocks in reverse
order, so a request's tail blocks sit nearer the head of the queue and are
evicted before its head blocks, which are the ones other requests share.

One hash maps to at most one block: if two requests fill blocks with the same
prefix in the same step, the first registered stays the cached copy and the
other is an ordinary block (freed without being findable).

With ``enable_caching=False`` nothing is ever registered and ``lookup``
always misses. Every operation is O(number of block ids passed in).

Cache events (opt-in, for the prefix-aware router): after ``record_events()``
the pool appends ``("cached", hash, parent_hash)`` when a block is registered
and ``("evicted", hash, None)`` when a cached block's hash is dropped, in the
order they happen, to a deque; ``drain_events()`` pops them. Appending and
popping a deque are atomic, so another thread may drain while the engine
thread steps. Cost: O(1) per registered or evicted block. Without
``record_events()`` nothing is kept (the offline engine never drains).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from tierserve.errors import InvalidParameterError, TierserveError


class OutOfBlocksError(TierserveError, RuntimeError):
    """``allocate`` asked for more blocks than the free queue holds."""

    def __init__(self, requested: int, num_free: int, num_blocks: int):
        super().__init__(
            f"num_blocks: cannot allocate {requested} KV blocks, only {num_free} of "
            f"{num_blocks} are free")
        self.requested = requested
        self.num_free = num_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise InvalidParameterError("num_blocks", f"must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        #: cached blocks whose hash was dropped because allocate reused them
        self.num_evictions = 0
        self._events: deque | None = None

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free queue with ref count 1.

        A reused cached block loses its hash mapping (an eviction).
        """
        if n < 0:
            raise InvalidParameterError("n", f"must be >= 0, got {n}")
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks)
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash_of[block]
            if old is not None:
                self._hash_of[block] = None
                if self._block_of.get(old) == block:
                    del self._block_of[old]
                    if self._events is not None:
                        self._events.append(("evicted", old, None))
                self.num_evictions += 1
            self._ref[block] = 1
            out.append(block)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a block at ref 0 leaves the free queue (revival)."""
        for block in block_ids:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; a block reaching 0 joins the queue tail."""
        for block in block_ids:
            if self._ref[block] <= 0:
                raise ValueError(f"block {block} freed more times than it was referenced")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None

    # -- prefix cache -----------------------------------------------------------------------

    def cache_block(self, block_id: int, block_hash: bytes, parent_hash: bytes | None = None) -> None:
        """Register a full block under its prefix hash (no-op without caching or on a duplicate hash).

        ``parent_hash`` (the previous block's hash, None for a first block) is
        only used by the event log, so a consumer can rebuild chains.
        """
        if not self.enable_caching:
            return
        current = self._hash_of[block_id]
        if current is not None:
            if current != block_hash:
                raise ValueError(f"block {block_id} is already cached under another hash")
            return
        if block_hash in self._block_of:
            return
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        if self._events is not None:
            self._events.append(("cached", block_hash, parent_hash))

    # -- cache events -----------------------------------------------------------------------

    def record_events(self) -> None:
        """Start logging cache events (idempotent); see the module docstring."""
        if self._events is None:
            self._events = deque()

    def drain_events(self) -> list[tuple[str, bytes, bytes | None]]:
        """Pop every logged event, oldest first ([] when not recording)."""
        out = []
        events = self._events
        while events:
            out.append(events.popleft())
        return out

    def lookup(self, block_hash: bytes) -> int | None:
        """The cached block holding this prefix hash, whether in use or waiting in the free queue."""
        return self._block_of.get(block_hash)

    # -- inspection -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks with ref count 0, including evictable cached ones."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks with ref count > 0."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash_of[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids, head (next to allocate) first. O(num_free): for tests and debugging."""
        return list(self._free)
