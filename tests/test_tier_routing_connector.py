"""A real KVTierConnector (LMCache DRAM + disk + a real redis-server) reports its chunks to the router.

Tiny KV spec (2 layers, 1 head, dim 4, block 4, chunk 2 blocks), no model: chunks are stored from random
pages, ``holdings()`` (``TierHoldings``: keys held per tier, drained Redis events) is read through
``TierMirror`` into a ``TierIndex``, and its matches are checked against the chunk keys ``chunk_keys``
computes independently.
"""

from __future__ import annotations


import pytest
import torch

from polling import wait_for
from test_kv_tiers import start_redis, stop_redis
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.kv_spec import KVSpec
from tierserve.cache.tiers.chunk import chunk_keys
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.connector import KVTierConnector
from tierserve.cache.prefix_hash import hash_blocks
from tierserve.engine.request import Request
from tierserve.routing.tier_index import TierIndex
from tierserve.server.cache_reporter import TierMirror

BS, CB = 4, 2


@pytest.fixture(scope="module")
def connector(tmp_path_factory):
    proc, url = start_redis()
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS)
    cfg = KVTierConfig(tiers=("dram", "disk", "redis"), chunk_blocks=CB, dram_gib=0.01, disk_gib=0.01,
                       disk_path=str(tmp_path_factory.mktemp("kvdisk")), redis_url=url)
    gen = torch.Generator().manual_seed(0)
    caches = [LayerKV(torch.randn(16, BS, 1, 4, generator=gen), torch.randn(16, BS, 1, 4, generator=gen))
              for _ in range(2)]
    conn = KVTierConnector(cfg, spec, "tier-routing-test", caches)
    yield conn, caches
    conn.close()
    stop_redis(proc)


def stored_request(rid: str, tokens: list[int], blocks: list[int]) -> Request:
    req = Request(rid, tokens)
    req.block_ids = blocks
    req.num_computed_tokens = len(tokens)
    return req


def test_connector_holdings_reach_the_router_and_follow_evictions(connector):
    conn, caches = connector
    tokens = list(range(100, 117))                               # 17 tokens: 2 whole chunks of 8
    keys = chunk_keys(tokens, BS, CB)
    assert keys == [hash_blocks(tokens, BS)[1], hash_blocks(tokens, BS)[3]]
    conn.on_finish(stored_request("a", tokens, [0, 1, 2, 3, 4]))
    events: dict[bytes, bool] = {}

    def both_on_disk():  # disk writes are async; every holdings() call drains the Redis events: keep them
        h = conn.holdings()
        events.update(h.shared_events)
        return len(h.held["disk"]) == 2 and h

    held = wait_for(both_on_disk).held
    assert {t: sorted(v) for t, v in held.items()} == {"dram": sorted(keys), "disk": sorted(keys)}
    assert events == {keys[0]: True, keys[1]: True}
    assert conn.holdings().shared_events == {}

    mirror, index = TierMirror(conn.chunk_blocks), TierIndex()
    index.apply("r", mirror.diff(conn.holdings().held, {keys[0]: True, keys[1]: True}))
    mirror.ack()
    request = hash_blocks(tokens + [1, 2, 3], BS)               # 5 blocks: chunks 0 and 1 + one more block
    assert index.match(request, {}, ["r", "other"]) == {"dram": {"r": 4}, "redis": {"other": 4}}

    # DRAM drops chunk 0 (as an LRU eviction would): disk serves it now, DRAM still serves chunk 1.
    conn.backend("dram").remove(keys[0])
    h = conn.holdings()
    diff = mirror.diff(h.held, h.shared_events)
    assert (dict(diff.added), dict(diff.evicted)) == ({}, {"dram": [keys[0]]})
    index.apply("r", diff)
    mirror.ack()
    assert index.match(request, {}, ["r"]) == {"disk": {"r": 2}, "dram": {"r": 2}}

    # A lookup that misses in Redis (while Redis is up) reports that key as missing for everyone.
    other = list(range(500, 517))
    assert conn.match(Request("b", other), 0) == 0
    h = conn.holdings()
    assert h.shared_events == {chunk_keys(other, BS, CB)[0]: False}
    index.apply("r", mirror.diff(h.held, h.shared_events))
    mirror.ack()
    # Redis loses chunk 1 behind everyone's back: the next lookup that reaches Redis for it reports it.
    for tier in ("redis", "dram", "disk"):
        conn.backend(tier).remove(keys[1])
    assert conn.match(Request("c", tokens), 0) == 8               # chunk 0 from disk, chunk 1 gone
    h = conn.holdings()
    assert h.shared_events == {keys[1]: False}
    index.apply("r", mirror.diff(h.held, h.shared_events))
    # chunk 0: disk has it and the hit re-filled DRAM (connector doc), so DRAM serves it again
    assert index.match(request, {}, ["r", "other"]) == {"dram": {"r": 2}, "redis": {"other": 2}}


def test_a_retried_match_reuses_its_fetched_chunks(connector):
    """A request that waits at the head of the queue is matched every step: the chunks are read once."""
    conn, caches = connector
    tokens = list(range(300, 317))                               # 2 whole chunks + 1 token
    conn.on_finish(stored_request("w", tokens, [5, 6, 7, 8, 9]))
    req = Request("w2", tokens)
    assert conn.match(req, 0) == 16
    lookups = conn.stats().lookups
    assert conn.match(req, 0) == 16 and conn.stats().lookups == lookups           # the retry: no second read
    assert conn.match(req, 8) == 8 and conn.stats().lookups == lookups + 1        # a longer device hit: anew
    conn.on_release("w2")
