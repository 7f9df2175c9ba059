"""KVCacheManager: per-request block tables over a BlockPool, with prefix caching.

A request's block table ``req.block_ids`` maps token position ``p`` to block
``req.block_ids[p // block_size]``, offset ``p % block_size``.

Prefix lookup (``get_computed_blocks``): hash the request's full blocks of
known tokens (prompt + outputs; outputs matter for a preempted request) with
the chain of prefix_hash.py and walk them while the pool has a cached block
for the hash. The hit is capped at ``(num_tokens - 1) // block_size`` blocks,
so at least one token is always left to compute (the step that computes it
produces the next token's logits): when the whole token list is cached the
last block is dropped. Only whole blocks ever hit.

Allocation (``allocate_slots``): touch the prefix-hit blocks, then allocate
``ceil((num_computed + hit + num_new) / block_size) - len(table)`` new blocks.
If the free queue is too short -- counting that touching a hit block waiting
at ref count 0 takes it out of the free queue -- return None before changing
anything. Afterwards every block that is full of *known* tokens once this
step's tokens are computed is registered in the pool under its hash.

Why registering at schedule time is safe: the engine is single-threaded and
runs schedule -> forward -> postprocess in turn. A block registered now gets
its KV written by this step's forward. The next lookup that can return it is
either in a later schedule() call (after the forward finished), or later in
this same schedule() call by a request placed after the writer in the step's
batch; the paged-attention step writes the whole batch's new K/V of a layer
before any sequence of that layer attends, so that reader sees the data too.

Work per step is O(tokens in the step): the block hashes of a request are
memoised in a list per request id and extended only by the blocks that became
full, so a decode step hashes at most one block (block_size tokens) however
long the context is. The full-prompt hash happens once per admission (at the
lookup). ``hash_fn`` is injectable (tests count its calls).

Rollback (``truncate``, speculative decoding): a request whose drafts were
rejected goes back to fewer computed tokens; the blocks past the new end are
freed tail first (O(blocks freed)).

KV compression by eviction (``evict_blocks``, used by
tierserve/cache/compress/driver.py): dropping whole blocks from a request's
table leaves ``num_computed_tokens`` (real positions) unchanged and counts
the dropped tokens in ``num_evicted_tokens``; the request then holds
``num_computed_tokens - num_evicted_tokens`` tokens and allocation counts
those. Its later blocks are no longer registered in the prefix cache (their
table index no longer matches their token range); blocks registered before
stay valid (their contents never change). Freeing the request resets the
count (a preempted request recomputes everything).

Stats: every lookup adds ``req.num_tokens`` to ``queries_tokens`` and the hit
length to ``hit_tokens`` (a request retried at the head of the queue is
counted at each attempt, numerator and denominator alike).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tierserve.cache.block_pool import BlockPool
from tierserve.cache.prefix_hash import hash_block
from tierserve.step.request_view import RequestView as Request
from tierserve.errors import InvalidParameterError

HashFn = Callable[[bytes | None, Sequence[int], tuple], bytes]


@dataclass(frozen=True)
class PrefixCacheStats:
    """Totals since the manager was built: tokens looked up and tokens served from cache."""

    queries_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queries_tokens if self.queries_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 hash_fn: HashFn = hash_block):
        if block_size < 1:
            raise InvalidParameterError("block_size", f"must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._hash_fn = hash_fn
        self._hashes: dict[str, list[bytes]] = {}
        self._num_registered: dict[str, int] = {}
        self._evicted: dict[str, int] = {}
        self._queries_tokens = 0
        self._hit_tokens = 0

    # -- lookup -----------------------------------------------------------------------------

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached chain of full blocks for ``req``'s tokens: (block ids, tokens covered).

        The blocks are not touched yet; pass them to ``allocate_slots``.
        """
        if req.block_ids:
            raise ValueError(f"request {req.request_id} already holds blocks; look up before allocating")
        if not self.enable_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(req, max_blocks)
        blocks: list[int] = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            blocks.append(block)
        num_hit = len(blocks) * self.block_size
        self._queries_tokens += req.num_tokens
        self._hit_tokens += num_hit
        return blocks, num_hit

    # -- allocation -------------------------------------------------------------------------

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> list[int] | None:
        """Grow ``req.block_ids`` to hold this step's tokens; the new block ids, or None (no change)."""
        if num_new_tokens < 0:
            raise InvalidParameterError("num_new_tokens", f"must be >= 0, got {num_new_tokens}")
        if computed_blocks and (req.block_ids or req.num_computed_tokens):
            raise ValueError(f"request {req.request_id}: prefix-hit blocks are only taken at admission")
        num_hit = len(computed_blocks) * self.block_size
        total = req.num_computed_tokens + num_hit + num_new_tokens - self._evicted.get(req.request_id, 0)
        needed = -(-total // self.block_size) - len(req.block_ids) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self.pool.ref_count(b) == 0)
        if max(needed, 0) > self.pool.num_free - revived:
            return None

        if computed_blocks:
            self.pool.touch(computed_blocks)
            req.block_ids.extend(computed_blocks)
            self._num_registered[req.request_id] = len(computed_blocks)
        new_blocks = self.pool.allocate(needed) if needed > 0 else []
        req.block_ids.extend(new_blocks)
        if self.enable_caching:
            self._register_full_blocks(req, min(total, req.num_tokens) // self.block_size)
        return new_blocks

    def free(self, req: Request) -> None:
        """Release the request's blocks, tail first (so its head blocks stay cached longest)."""
        self.pool.free(reversed(req.block_ids))
        req.block_ids.clear()
        self._hashes.pop(req.request_id, None)
        self._num_registered.pop(req.request_id, None)
        self._evicted.pop(req.request_id, None)

    def truncate(self, req: Request, num_tokens: int) -> list[int]:
        """Roll ``req`` back to ``num_tokens`` computed tokens (speculative drafts rejected).

        Sets ``num_computed_tokens`` and frees, tail first, the blocks past
        ``ceil(num_tokens / block_size)``; returns their ids. The freed blocks
        were never registered in the prefix cache (only blocks full of known
        tokens are, and the rollback keeps every known token's KV but the last).
        """
        if not 0 < num_tokens <= req.num_computed_tokens:
            raise InvalidParameterError("num_tokens", f"must be in [1, {req.num_computed_tokens}] for request "
                                                      f"{req.request_id}, got {num_tokens}")
        keep = -(-(num_tokens - self._evicted.get(req.request_id, 0)) // self.block_size)
        if keep < self._num_registered.get(req.request_id, 0):
            raise ValueError(f"request {req.request_id}: truncating to {num_tokens} tokens would free "
                             f"prefix-cached blocks")
        freed = req.block_ids[keep:]
        if freed:
            self.pool.free(reversed(freed))
            del req.block_ids[keep:]
        req.num_computed_tokens = num_tokens
        return freed

    # -- eviction (KV compression) ------------------------------------------------------------

    def evict_blocks(self, req: Request, indices: Sequence[int]) -> None:
        """Drop ``req.block_ids[i]`` for each (full, not first, not last) index ``i``; see the docstring."""
        n = len(req.block_ids)
        if sorted(set(indices)) != list(indices) or any(not 0 < i < n - 1 for i in indices):
            raise InvalidParameterError("indices", f"must be sorted distinct block indices in [1, {n - 2}], "
                                                   f"got {list(indices)}")
        dropped = set(indices)
        self.pool.free(req.block_ids[i] for i in indices)
        req.block_ids[:] = [b for i, b in enumerate(req.block_ids) if i not in dropped]
        self._evicted[req.request_id] = self._evicted.get(req.request_id, 0) + len(dropped) * self.block_size

    def num_evicted_tokens(self, request_id: str) -> int:
        """Tokens of the request dropped by ``evict_blocks`` since it last got blocks."""
        return self._evicted.get(request_id, 0)

    # -- inspection -------------------------------------------------------------------------

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queries_tokens, self._hit_tokens)

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_hashes(self, req: Request) -> list[bytes]:
        """Hashes of the request's full blocks computed so far (a copy; for routing and tests)."""
        return list(self._hashes.get(req.request_id, ()))

    # -- internals --------------------------------------------------------------------------

    def _block_hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """The memoised hash list of ``req``, extended to at least ``num_blocks`` full blocks."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(self._hash_fn(parent, req.token_ids(i * bs, (i + 1) * bs), ()))
        return hashes

    def _register_full_blocks(self, req: Request, num_full: int) -> None:
        if req.request_id in self._evicted:  # table indices no longer match token blocks
            return
        start = self._num_registered.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(req.block_ids[i], hashes[i], hashes[i - 1] if i else None)
        self._num_registered[req.request_id] = num_full
