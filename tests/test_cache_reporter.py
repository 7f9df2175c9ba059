"""Block-pool cache events -> prefix-tree diffs (BlockPool.record_events + server/cache_reporter.py).

Exact assertions on hand-built chains, then a real KVCacheManager run whose reported chains must
rebuild exactly the pool's cached hash set in a PrefixTree.
"""

from __future__ import annotations

from tierserve.cache.block_pool import BlockPool
from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.cache.prefix_hash import hash_blocks
from tierserve.engine.request import Request
from tierserve.routing.prefix_tree import PrefixTree
from tierserve.sampling_params import SamplingParams
from tierserve.server.cache_reporter import CacheMirror

H = [bytes([i]) * 32 for i in range(8)]


def test_pool_logs_nothing_unless_asked():
    pool = BlockPool(4)
    pool.cache_block(pool.allocate(1)[0], H[0])
    assert pool.drain_events() == []


def test_pool_logs_cached_and_evicted_in_order():
    pool = BlockPool(2)
    pool.record_events()
    a, b = pool.allocate(2)
    pool.cache_block(a, H[0], None)
    pool.cache_block(b, H[1], H[0])
    pool.cache_block(b, H[1], H[0])                 # re-registering is not an event
    pool.free([b, a])
    assert pool.drain_events() == [("cached", H[0], None), ("cached", H[1], H[0])]
    pool.allocate(1)                                 # reuses b (freed first): its hash is evicted
    assert pool.drain_events() == [("evicted", H[1], None)]
    assert pool.drain_events() == []


def test_mirror_reports_chains_from_the_root_and_evictions():
    m = CacheMirror()
    m.apply([("cached", H[0], None), ("cached", H[1], H[0]), ("cached", H[2], H[1]), ("cached", H[3], H[1])])
    chains, evicted = m.diff()
    assert sorted(chains) == sorted([[H[0], H[1], H[2]], [H[0], H[1], H[3]]]) and evicted == []
    assert m.diff() == ([], [])
    # a decode fills one more block: the whole path is sent again (the tree wants root chains)
    m.apply([("cached", H[4], H[2])])
    assert m.diff() == ([[H[0], H[1], H[2], H[4]]], [])
    m.apply([("evicted", H[3], None)])
    assert m.diff() == ([], [H[3]])
    # cached and evicted between two reports: never reaches the tree; evicted and re-cached: no change
    m.apply([("cached", H[5], None), ("evicted", H[5], None), ("evicted", H[4], None), ("cached", H[4], H[2])])
    assert m.diff() == ([], [])


def test_mirror_holds_back_blocks_whose_ancestor_is_gone():
    m = CacheMirror()
    m.apply([("cached", H[0], None)])
    m.diff()
    m.apply([("evicted", H[0], None), ("cached", H[1], H[0])])   # child registered after the parent left
    assert m.diff() == ([], [H[0]])
    m.apply([("cached", H[0], None)])                          # the parent comes back: both reported
    assert m.diff() == ([[H[0], H[1]]], [])


def test_real_manager_diffs_rebuild_the_pool_in_a_prefix_tree():
    bs = 4
    kv = KVCacheManager(num_blocks=8, block_size=bs)
    kv.pool.record_events()
    mirror, tree = CacheMirror(), PrefixTree()

    def report():
        mirror.apply(kv.pool.drain_events())
        chains, evicted = mirror.diff()
        tree.evict("r", evicted)
        for c in chains:
            tree.add_chain("r", c)

    def run(rid: str, tokens: list[int]) -> Request:
        req = Request(rid, tokens, SamplingParams(max_tokens=1), arrival=0)
        hit, n = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, len(tokens) - n, hit) is not None
        return req

    a = run("a", list(range(13)))                               # 3 full blocks cached
    report()
    assert tree.longest_match(hash_blocks(list(range(16)), bs)) == {"r": 3}
    kv.free(a)
    b = run("b", [100 + i for i in range(28)])                  # 7 blocks: evicts a's tail blocks
    report()
    cached = {kv.pool.block_hash(i) for i in range(8)} - {None}
    assert set(tree.blocks_of("r")) == cached
    assert tree.longest_match(hash_blocks([100 + i for i in range(28)], bs)) == {"r": 7}
    kv.free(b)
