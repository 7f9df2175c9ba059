"""The TierBackend contract (cache/tiers/backend.py), per backend, over LMCache and a real redis-server.

* The registry lists every tier of ``KVTierConfig`` in lookup order.
* Each backend (DRAM, disk, Redis), built by ``build_tiers``: put -> contains -> get (the same bytes)
  -> holdings (DRAM/disk: the key set; Redis: the drained net event per key) -> remove -> gone, with
  no failure counted.
* Redis failing: killed mid-run, its breaker opens after the first failed call and no further call is
  made while it is open; a connector keeps serving and storing through DRAM and disk. Unreachable from
  the start: the tiers above still serve.
"""

from __future__ import annotations

import signal

import pytest
import torch

from polling import wait_for
from test_kv_tiers import free_port, start_redis, stop_redis
from tierserve.cache.tiers.backend import BackendHoldings, TierBackend
from tierserve.cache.tiers.chunk import chunk_keys, record_size, verify_record, write_record
from tierserve.cache.tiers.config import TIER_ORDER, KVTierConfig
from tierserve.cache.tiers.connector import KVTierConnector, TierHoldings
from tierserve.cache.tiers.registry import TIER_BACKENDS, build_tiers
from tierserve.engine.request import Request
from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.kv_spec import KVSpec

SHAPE = (2, 2, 8, 1, 4)  # [layers, K/V, chunk tokens, kv heads, head dim] of a float32 chunk: 512 payload bytes
BS, CB = 4, 2


def test_registry_lists_every_tier_in_lookup_order():
    assert tuple(TIER_BACKENDS) == TIER_ORDER == ("dram", "disk", "redis")
    assert all(issubclass(cls, TierBackend) and cls.name == name for name, cls in TIER_BACKENDS.items())
    assert [name for name, cls in TIER_BACKENDS.items() if cls.caches_lower_hits] == ["dram"]
    with pytest.raises(TypeError):
        TierBackend()  # the contract is abstract


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    proc, url = start_redis()
    cfg = KVTierConfig(tiers=("dram", "disk", "redis"), chunk_blocks=CB, dram_gib=0.01, disk_gib=0.01,
                       disk_path=str(tmp_path_factory.mktemp("kvdisk")), redis_url=url)
    runtime, backends = build_tiers(cfg, "tier-backend-test", "float32", SHAPE[2], SHAPE)
    yield runtime, {b.name: b for b in backends}
    for b in backends:
        b.close()
    runtime.close()
    stop_redis(proc)


def make_record(runtime, key: bytes, seed: int):
    payload = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    raw = payload.view(torch.uint8).view(-1).numpy()
    record = runtime.allocate(record_size(raw.nbytes))
    write_record(record.view(), key, "float32", SHAPE, memoryview(raw))
    return record, raw.tobytes()


@pytest.mark.parametrize("tier", TIER_ORDER)
def test_backend_put_contains_get_holdings_remove(tiers, tier):
    runtime, backends = tiers
    b = backends[tier]
    key = bytes([TIER_ORDER.index(tier) + 1]) * 32
    b.holdings()  # drain what earlier calls left (Redis events)
    assert not b.contains(key) and b.get(key) is None
    record, payload = make_record(runtime, key, seed=len(tier))
    assert b.put(key, record) is True
    record.release()
    wait_for(lambda: b.contains(key))  # disk and Redis writes land asynchronously
    got = b.get(key)
    assert bytes(verify_record(got.view(), key, "float32", SHAPE)) == payload
    got.release()
    held = b.holdings()
    if tier == "redis":  # shared: no key list; the net last event of the key (missed, put, found) is "held"
        assert held == BackendHoldings(None, {key: True})
        assert b.holdings() == BackendHoldings(None, {})  # drained
    else:
        assert held.keys == frozenset({key}) and dict(held.events) == {}
    b.remove(key)
    assert not b.contains(key) and b.get(key) is None
    held = b.holdings()
    assert held == (BackendHoldings(None, {key: False}) if tier == "redis" else BackendHoldings(frozenset()))
    assert b.failures == 0


def _caches() -> list[LayerKV]:
    gen = torch.Generator().manual_seed(0)
    return [LayerKV(torch.randn(16, BS, 1, 4, generator=gen), torch.randn(16, BS, 1, 4, generator=gen))
            for _ in range(2)]


def _finished(rid: str, tokens: list[int], blocks: list[int]) -> Request:
    req = Request(rid, tokens)
    req.block_ids, req.num_computed_tokens = blocks, len(tokens)
    return req


def test_redis_killed_breaker_opens_and_other_tiers_keep_serving(tmp_path):
    proc, url = start_redis()
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS)
    cfg = KVTierConfig(tiers=("dram", "disk", "redis"), chunk_blocks=CB, dram_gib=0.01, disk_gib=0.01,
                       disk_path=str(tmp_path), redis_url=url, redis_timeout_s=0.5, redis_retry_s=600.0)
    conn = KVTierConnector(cfg, spec, "tier-redis-failure-test", _caches())
    try:
        tokens = list(range(100, 117))  # 2 whole chunks of 8 tokens
        k0, k1 = chunk_keys(tokens, BS, CB)
        conn.on_finish(_finished("a", tokens, [0, 1, 2, 3, 4]))
        wait_for(lambda: all(conn.backend(t).contains(k) for t in ("disk", "redis") for k in (k0, k1)))
        assert conn.holdings().shared_events == {k0: True, k1: True}
        conn.backend("dram").remove(k0)  # chunk 0 on disk (and Redis) only
        for tier in ("dram", "disk"):
            conn.backend(tier).remove(k1)  # chunk 1 in Redis only
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        assert conn.match(Request("b", tokens), 0) == 8  # chunk 0 from disk; Redis fails for chunk 1
        redis = conn.backend("redis")
        failures = redis.failures
        assert failures >= 1 and not redis.available()
        assert conn.stats().hits == {"dram": 0, "disk": 1, "redis": 0}
        conn.on_release("b")
        assert conn.match(Request("c", tokens), 0) == 8  # chunk 0 from DRAM now (the disk hit refilled it)
        conn.on_release("c")
        other = list(range(300, 317))
        before = conn.stats().bytes_stored
        conn.on_finish(_finished("d", other, [5, 6, 7, 8, 9]))  # stored in DRAM and disk, Redis skipped
        after = conn.stats()
        assert {t: after.bytes_stored[t] - before[t] for t in before} == {"dram": 2 * conn.payload_bytes,
                                                                          "disk": 2 * conn.payload_bytes,
                                                                          "redis": 0}
        assert after.hits == {"dram": 1, "disk": 1, "redis": 0}
        assert redis.failures == failures  # the open breaker made no further Redis call
        assert conn.holdings().shared_events == {}  # nothing learned about Redis while it was down
    finally:
        conn.close()
        stop_redis(proc)


def test_redis_unreachable_from_the_start_dram_serves():
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS)
    cfg = KVTierConfig(tiers=("dram", "redis"), chunk_blocks=CB, dram_gib=0.01,
                       redis_url=f"redis://127.0.0.1:{free_port()}", redis_timeout_s=0.5, redis_retry_s=600.0)
    conn = KVTierConnector(cfg, spec, "tier-redis-down-test", _caches())
    try:
        tokens = list(range(100, 117))
        conn.on_finish(_finished("a", tokens, [0, 1, 2, 3, 4]))
        assert conn.match(Request("b", tokens), 0) == 16
        stats = conn.stats()
        assert stats.hits == {"dram": 2, "redis": 0}
        assert stats.bytes_stored == {"dram": 2 * conn.payload_bytes, "redis": 0}
        assert stats.failures["dram"] == 0 and stats.failures["redis"] >= 1
        assert conn.holdings() == TierHoldings({"dram": frozenset(chunk_keys(tokens, BS, CB))}, {})
    finally:
        conn.close()
