"""BlockPool: ref counts, LRU free-queue order, eviction of cached blocks, O(1) revival."""

from __future__ import annotations

import pytest

from tierserve.cache.block_pool import BlockPool, OutOfBlocksError
from tierserve.cache.prefix_hash import hash_block
from tierserve.errors import InvalidParameterError

H = [hash_block(None, [i]) for i in range(8)]


def test_allocate_from_head_and_lru_order_of_freed_blocks():
    pool = BlockPool(6)
    assert pool.free_queue() == [0, 1, 2, 3, 4, 5]
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert (a, b) == ([0, 1], [2, 3])
    assert pool.num_free == 2 and pool.usage == pytest.approx(4 / 6)
    pool.free(reversed(b))          # request b finishes first, tail block first
    pool.free(reversed(a))
    # never-used blocks, then freed blocks in the order they were freed
    assert pool.free_queue() == [4, 5, 3, 2, 1, 0]
    assert pool.allocate(3) == [4, 5, 3]
    assert pool.usage == pytest.approx(1 / 6 * 3)


def test_eviction_drops_hash_only_when_block_is_reallocated():
    pool = BlockPool(4)
    blocks = pool.allocate(3)                 # [0, 1, 2]
    for blk, h in zip(blocks, H):
        pool.cache_block(blk, h)
    pool.free(reversed(blocks))               # queue: 3, 2, 1, 0
    assert pool.free_queue() == [3, 2, 1, 0]
    # freed cached blocks still answer lookups
    assert [pool.lookup(h) for h in H[:3]] == [0, 1, 2]
    assert pool.num_cached_blocks == 3 and pool.num_evictions == 0
    assert pool.allocate(2) == [3, 2]         # 3 was never cached, 2 was
    assert pool.num_evictions == 1
    assert pool.lookup(H[2]) is None and pool.block_hash(2) is None
    assert pool.lookup(H[0]) == 0 and pool.lookup(H[1]) == 1
    assert pool.allocate(1) == [1]
    assert pool.num_evictions == 2 and pool.lookup(H[1]) is None


def test_touch_revives_cached_free_block_out_of_queue_order():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for blk, h in zip(blocks, H):
        pool.cache_block(blk, h)
    pool.free([3, 2, 1, 0])
    assert pool.num_free == 4 and pool.usage == 0.0
    pool.touch([pool.lookup(H[1])])           # a prefix hit on block 1 (middle of the queue)
    assert pool.ref_count(1) == 1
    assert pool.free_queue() == [3, 2, 0]
    pool.touch([1])                            # second sharer: ref 2, queue untouched
    assert pool.ref_count(1) == 2 and pool.num_free == 3
    assert pool.allocate(3) == [3, 2, 0]
    assert pool.num_evictions == 3 and pool.lookup(H[1]) == 1
    pool.free([1])
    assert pool.ref_count(1) == 1 and pool.num_free == 0
    pool.free([1])
    assert pool.free_queue() == [1]


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(OutOfBlocksError) as e:
        pool.allocate(2)
    assert "only 1 of 3" in str(e.value) and e.value.requested == 2
    assert pool.free_queue() == [2]
    assert pool.allocate(0) == []


def test_duplicate_hash_keeps_first_block_and_double_free_is_an_error():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, H[0])
    pool.cache_block(b, H[0])                  # same content computed twice: first copy wins
    assert pool.lookup(H[0]) == a and pool.block_hash(b) is None
    pool.cache_block(a, H[0])                  # idempotent
    with pytest.raises(ValueError):
        pool.cache_block(a, H[1])
    pool.free([b])
    with pytest.raises(ValueError):
        pool.free([b])


def test_caching_disabled_never_indexes():
    pool = BlockPool(2, enable_caching=False)
    (blk,) = pool.allocate(1)
    pool.cache_block(blk, H[0])
    assert pool.lookup(H[0]) is None and pool.num_cached_blocks == 0


def test_invalid_size():
    with pytest.raises(InvalidParameterError) as e:
        BlockPool(0)
    assert e.value.field == "num_blocks"
