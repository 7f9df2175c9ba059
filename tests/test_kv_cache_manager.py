"""KVCacheManager: prefix lookup, all-or-nothing slot allocation, incremental block hashing."""

from __future__ import annotations

import pytest

from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.cache.prefix_hash import hash_block, hash_blocks
from tierserve.engine.request import Request


class CountingHash:
    """The real hash_block, counting calls and hashed tokens (injected via hash_fn)."""

    def __init__(self):
        self.calls = 0
        self.tokens = 0

    def __call__(self, parent, token_ids, extra=()):
        self.calls += 1
        self.tokens += len(token_ids)
        return hash_block(parent, token_ids, extra)


def req(rid, tokens):
    return Request(rid, list(tokens))


def run_prefill(kv, r, num_tokens=None):
    """Allocate and mark computed like the scheduler does for a whole prefill."""
    blocks, hit = kv.get_computed_blocks(r)
    n = (num_tokens if num_tokens is not None else r.num_tokens) - hit
    new = kv.allocate_slots(r, n, blocks)
    assert new is not None
    r.num_computed_tokens = hit + n
    return blocks, hit, new


def test_prefix_hit_covers_whole_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", range(10))
    assert run_prefill(kv, a) == ([], 0, [0, 1, 2])
    # blocks 0 and 1 are full -> registered under the chained hashes of tokens 0..7
    expected = hash_blocks(list(range(10)), 4)
    assert [kv.pool.block_hash(b) for b in (0, 1, 2)] == expected + [None]

    assert kv.get_computed_blocks(req("b", range(10))) == ([0, 1], 8)
    assert kv.get_computed_blocks(req("c", range(8))) == ([0], 4)     # fully cached: drop the last block
    assert kv.get_computed_blocks(req("d", range(9))) == ([0, 1], 8)  # one token left
    assert kv.get_computed_blocks(req("e", [0, 1, 2, 3, 4, 5, 6, 99, 8])) == ([0], 4)
    assert kv.get_computed_blocks(req("f", [7, 1, 2, 3, 4, 5, 6, 7, 8])) == ([], 0)
    assert kv.get_computed_blocks(req("g", range(3))) == ([], 0)
    assert kv.stats.queries_tokens == 10 + 8 + 9 + 9 + 9 + 3 + 10  # includes a's own lookup
    assert kv.stats.hit_tokens == 8 + 4 + 8 + 4
    assert kv.stats.hit_rate == pytest.approx(24 / 58)


def test_prefix_hit_shares_blocks_and_revives_freed_ones():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", range(10))
    run_prefill(kv, a)                                  # a: [0, 1, 2]
    b = req("b", list(range(8)) + [50, 51, 52])
    assert run_prefill(kv, b) == ([0, 1], 8, [3])       # shares 0, 1; new block 3
    assert b.block_ids == [0, 1, 3]
    assert [kv.pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    kv.free(a)
    assert a.block_ids == [] and kv.pool.free_queue() == [4, 5, 2]
    kv.free(b)                                          # reverse order: 3, then 1, 0
    assert kv.pool.free_queue() == [4, 5, 2, 3, 1, 0]
    c = req("c", list(range(8)) + [60])
    assert run_prefill(kv, c) == ([0, 1], 8, [4])       # revived from the free queue
    assert kv.pool.free_queue() == [5, 2, 3]
    assert kv.num_free_blocks == 3 and kv.usage == pytest.approx(0.5)


def test_allocate_slots_returns_none_without_side_effects():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", range(9))
    run_prefill(kv, a)                                  # a: [0, 1, 2], 0 and 1 cached
    kv.free(a)
    assert kv.pool.free_queue() == [3, 2, 1, 0] and kv.num_free_blocks == 4
    # 17 tokens: 2 hit blocks + 3 new; 4 blocks are free but 2 of them are the hit blocks
    b = req("b", list(range(8)) + list(range(100, 109)))
    blocks, hit = kv.get_computed_blocks(b)
    assert (blocks, hit) == ([0, 1], 8)
    before = (kv.pool.free_queue(), [kv.pool.ref_count(i) for i in range(4)],
              [kv.pool.block_hash(i) for i in range(4)], kv.pool.num_evictions)
    assert kv.allocate_slots(b, 9, blocks) is None
    after = (kv.pool.free_queue(), [kv.pool.ref_count(i) for i in range(4)],
             [kv.pool.block_hash(i) for i in range(4)], kv.pool.num_evictions)
    assert before == after and b.block_ids == [] and b.num_computed_tokens == 0
    # 16 tokens fit exactly: 2 hit blocks + 2 new (block 2 held a's partial tail, never cached)
    assert kv.allocate_slots(b, 8, blocks) == [3, 2]
    assert b.block_ids == [0, 1, 3, 2] and kv.pool.num_evictions == 0
    assert kv.pool.free_queue() == []
    # running request that cannot grow: None, table unchanged
    b.num_computed_tokens = 16
    assert kv.allocate_slots(b, 1) is None and b.block_ids == [0, 1, 3, 2]


def test_blocks_registered_incrementally_one_hash_per_filled_block():
    counter = CountingHash()
    kv = KVCacheManager(num_blocks=300, block_size=16, hash_fn=counter)
    prompt = [(7 * i) % 1000 for i in range(1000)]
    r = req("r", prompt)
    run_prefill(kv, r)
    assert counter.calls == 1000 // 16                  # 62 full blocks, each hashed once
    assert len(r.block_ids) == 63
    # decode: append a sampled token, compute it; a hash only when a block fills up
    for step in range(37):
        r.append_output(step)
        counter.calls = counter.tokens = 0
        new = kv.allocate_slots(r, 1)
        r.num_computed_tokens += 1
        filled = 1 if r.num_computed_tokens % 16 == 0 else 0
        assert counter.calls == filled, step
        assert counter.tokens == 16 * filled
        if r.num_computed_tokens % 16 == 1:
            assert len(new) == 1
        else:
            assert new == []
    tokens = r.token_ids()
    assert kv.block_hashes(r) == hash_blocks(tokens[: r.num_computed_tokens], 16)
    # every full block is findable; the partial tail is not
    full = r.num_computed_tokens // 16
    assert [kv.pool.lookup(h) for h in kv.block_hashes(r)] == r.block_ids[:full]
    assert kv.pool.block_hash(r.block_ids[-1]) is None


def test_chunked_prefill_registers_only_blocks_full_after_the_step():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("r", range(14))
    assert kv.allocate_slots(r, 6) == [0, 1]
    r.num_computed_tokens = 6
    assert kv.pool.num_cached_blocks == 1 and kv.pool.block_hash(1) is None
    assert kv.allocate_slots(r, 6) == [2]
    r.num_computed_tokens = 12
    assert kv.pool.num_cached_blocks == 3
    assert [kv.pool.block_hash(b) for b in r.block_ids] == hash_blocks(list(range(14)), 4)


def test_lookahead_beyond_known_tokens_does_not_register():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r = req("r", range(3))
    assert kv.allocate_slots(r, 8) == [0, 1]            # slots for 8 tokens, only 3 known
    assert kv.pool.num_cached_blocks == 0


def test_caching_disabled_never_hits_or_hashes():
    counter = CountingHash()
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False, hash_fn=counter)
    run_prefill(kv, req("a", range(10)))
    assert kv.get_computed_blocks(req("b", range(10))) == ([], 0)
    assert counter.calls == 0 and kv.stats.queries_tokens == 0


def test_misuse_is_rejected():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", range(10))
    run_prefill(kv, a)
    with pytest.raises(ValueError):
        kv.get_computed_blocks(a)
    with pytest.raises(ValueError):
        kv.allocate_slots(a, 1, [0])
