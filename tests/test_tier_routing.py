"""Lower-tier KV hits as weighted partial matches: tier index, matching, reporter diffs, tree actor body.

Pure Python (no Ray, no torch): routing/tier_index.py, server/cache_reporter.py TierMirror and the
PrefixTreeActor class called directly. Exact block counts and routing decisions for hand-built holdings,
plus a brute-force per-block reference for the chunk-aligned walk.
"""

from __future__ import annotations

import random

import pytest

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing.policy import KV_TIER_WEIGHTS, PrefixAwarePolicy, ReplicaLoad
from tierserve.routing.tier_index import TierDiff, TierIndex, lower_tier_matches
from tierserve.routing.tree_actor import PrefixMatch, PrefixTreeActor
from tierserve.server.cache_reporter import TierMirror

CB = 16                                   # chunk_blocks
H = hash_blocks(list(range(80)), 1)       # 80 chained block hashes (block size 1)


def chunk_key(j: int, hashes=H) -> bytes:
    """Key of chunk j: the chained hash of its last block."""
    return hashes[(j + 1) * CB - 1]


def route(index: TierIndex, device: dict, loads: dict, hashes=H):
    lower = index.match(hashes, device, list(loads))
    policy = PrefixAwarePolicy(tier_weights=KV_TIER_WEIGHTS)
    return policy.choose(device, [ReplicaLoad(r, n) for r, n in loads.items()], lower or None,
                         num_request_blocks=len(hashes)), lower


def test_dram_chunks_beat_fewer_device_blocks_and_lose_to_more():
    idx = TierIndex()
    idx.apply("A", TierDiff(CB, added={"dram": [chunk_key(0), chunk_key(1)]}))
    d, lower = route(idx, {"B": 20}, {"A": 0, "B": 0})
    assert lower == {"dram": {"A": 32}}
    assert (d.replica_id, d.score, d.reason) == ("A", pytest.approx(25.6), "prefix")
    assert d.score > 20
    d, _ = route(idx, {"B": 30}, {"A": 0, "B": 0})
    assert (d.replica_id, d.score, d.matched_blocks) == ("B", 30.0, 30)


def test_redis_only_match_is_equal_for_all_replicas_so_load_decides():
    idx = TierIndex()
    idx.apply("A", TierDiff(CB, added={"redis": [chunk_key(0), chunk_key(1), chunk_key(2)]}))
    d, lower = route(idx, {}, {"A": 3, "B": 1, "C": 2})
    assert lower == {"redis": {"A": 48, "B": 48, "C": 48}}      # reported by A, counted for everyone
    assert (d.replica_id, d.reason, d.score) == ("B", "prefix", pytest.approx(0.3 * 48))
    d, _ = route(idx, {}, {"A": 0, "B": 1, "C": 2})
    assert d.replica_id == "A"


def test_walk_starts_at_the_device_match_and_credits_each_chunk_to_its_first_tier():
    idx = TierIndex()
    idx.apply("A", TierDiff(CB, added={"dram": [chunk_key(0), chunk_key(1)], "disk": [chunk_key(1), chunk_key(2)],
                                       "redis": [chunk_key(3)]}))
    # A has 20 device blocks: chunk 1 (dram first) adds 12, chunk 2 disk 16, chunk 3 redis 16, chunk 4 misses.
    assert idx.match(H, {"A": 20}, ["A"]) == {"dram": {"A": 12}, "disk": {"A": 16}, "redis": {"A": 16}}
    # B reaches chunk 3 only through Redis, but chunk 0 misses for B: nothing.
    assert idx.match(H, {}, ["B"]) == {}
    # B with 50 device blocks: chunk 3 (blocks 48..63) gives 14 more from Redis.
    assert idx.match(H, {"B": 50}, ["B"]) == {"redis": {"B": 14}}
    # Device covering whole chunks already: A with 64 device blocks, chunk 4 is held nowhere.
    assert idx.match(H, {"A": 64}, ["A"]) == {}
    # Only whole chunks inside the request count: 40 blocks hold chunks 0 and 1 only.
    assert idx.match(H[:40], {}, ["A"]) == {"dram": {"A": 32}}
    # score of A at 20 device blocks: 20 + 0.8*12 + 0.5*16 + 0.3*16
    d, _ = route(idx, {"A": 20}, {"A": 0, "B": 0})
    assert (d.replica_id, d.score) == ("A", pytest.approx(20 + 9.6 + 8 + 4.8))


def test_a_gap_stops_the_walk_and_another_prompt_does_not_match():
    idx = TierIndex()
    idx.apply("A", TierDiff(CB, added={"dram": [chunk_key(1), chunk_key(2)]}))   # chunk 0 missing
    assert idx.match(H, {}, ["A"]) == {}
    assert idx.match(H, {"A": 16}, ["A"]) == {"dram": {"A": 32}}
    other = hash_blocks([7] + list(range(1, 80)), 1)                               # differs in block 0
    assert idx.match(other, {"A": 16}, ["A"]) == {}


def _reference(hashes, device, rid, held, cb):
    """Per-block reference: block b >= d is served by tier t iff every chunk from d//cb to b//cb is held
    somewhere and t is the first tier holding chunk b//cb."""
    out = {}
    d = device.get(rid, 0)
    for b in range(d, len(hashes)):
        c = b // cb
        if (c + 1) * cb > len(hashes):
            break
        tiers_of = [[t for t in ("dram", "disk", "redis") if hashes[(k + 1) * cb - 1] in held[t]]
                    for k in range(d // cb, c + 1)]
        if not all(tiers_of):
            break
        t = tiers_of[-1][0]
        out[t] = out.get(t, 0) + 1
    return out


def test_matches_agree_with_a_per_block_reference_on_random_holdings():
    rng = random.Random(3)
    for trial in range(300):
        cb = rng.choice([1, 2, 3, 5])
        n = rng.randrange(0, 25)
        hashes = H[:n]
        keys = [hashes[(j + 1) * cb - 1] for j in range(n // cb)]
        held = {t: {k for k in keys if rng.random() < 0.5} for t in ("dram", "disk", "redis")}
        device = {"r": rng.randrange(0, n + 1)} if n else {}
        got = lower_tier_matches(hashes, device, ["r"], lambda t, r, k: k in held[t], cb)
        want = {t: {"r": v} for t, v in _reference(hashes, device, "r", held, cb).items()}
        assert got == want, (trial, cb, n, device)


def test_index_evictions_cap_and_replica_drop():
    idx = TierIndex(max_redis_chunks=2)
    k0, k1, k2 = chunk_key(0), chunk_key(1), chunk_key(2)
    idx.apply("A", TierDiff(CB, added={"dram": [k0, k1], "disk": [k0]}))
    idx.apply("A", TierDiff(CB, evicted={"dram": [k1]}))
    assert (idx.num_chunks("dram", "A"), idx.num_chunks("disk", "A")) == (1, 1)
    assert idx.match(H, {}, ["A"]) == {"dram": {"A": 16}}       # chunk 1 left DRAM and was never on disk
    # Redis: LRU cap of 2 keys; re-reporting k0 makes it most recent so k1 goes first.
    idx.apply("B", TierDiff(CB, added={"redis": [k0, k1]}))
    idx.apply("A", TierDiff(CB, added={"redis": [k0]}))
    idx.apply("A", TierDiff(CB, added={"redis": [k2]}))
    assert [idx.holds("redis", "Z", k) for k in (k0, k1, k2)] == [True, False, True]
    # a replica's lookup that missed k0 in Redis removes it for everyone
    idx.apply("B", TierDiff(CB, evicted={"redis": [k0]}))
    assert not idx.holds("redis", "A", k0)
    assert idx.replicas() == ["A"]
    assert idx.drop_replica("A") == 2 and idx.replicas() == [] and idx.holds("redis", "A", k2)
    with pytest.raises(InvalidParameterError) as e:
        idx.apply("C", TierDiff(8, added={"dram": [k0]}))
    assert e.value.field == "chunk_blocks"


def test_tier_diff_validation():
    with pytest.raises(InvalidParameterError):
        TierDiff(0)
    with pytest.raises(InvalidParameterError):
        TierDiff(4, added={"ssd": [H[0]]})
    with pytest.raises(InvalidParameterError):
        TierDiff(4, evicted={"dram": [b"short"]})
    assert TierDiff(4, added={"dram": []}).empty() and not TierDiff(4, evicted={"disk": [H[0]]}).empty()
    assert TierIndex().match(H, {}, ["A"]) == {}            # nothing reported yet


def test_tier_mirror_diffs_snapshots_and_passes_redis_events():
    m = TierMirror(CB)
    k0, k1, k2 = chunk_key(0), chunk_key(1), chunk_key(2)
    d = m.diff({"dram": [k0, k1], "disk": []})
    assert (d.chunk_blocks, dict(d.added), dict(d.evicted)) == (CB, {"dram": sorted([k0, k1])}, {})
    m.ack()
    assert m.diff({"dram": [k1, k0], "disk": []}) is None             # unchanged
    d = m.diff({"dram": [k1, k2], "disk": [k0]}, {k2: True, k0: False})
    assert dict(d.added) == {"dram": [k2], "disk": [k0], "redis": [k2]}
    assert dict(d.evicted) == {"dram": [k0], "redis": [k0]}
    # that report failed (no ack): the next diff re-sends it, merged with new events (newest per key wins)
    d = m.diff({"dram": [k1, k2], "disk": [k0]}, {k0: True})
    assert dict(d.added) == {"dram": [k2], "disk": [k0], "redis": [k2, k0]}
    assert dict(d.evicted) == {"dram": [k0]}
    m.ack()
    assert m.diff({"dram": [k1, k2], "disk": [k0]}) is None
    idx = TierIndex()
    idx.apply("A", TierMirror(CB).diff({"dram": [k0, k1]}))
    assert idx.match(H, {}, ["A"]) == {"dram": {"A": 32}}


def test_tree_actor_body_reports_and_matches_both_tiers():
    actor = PrefixTreeActor()
    # B: 20 device blocks of H; A: chunks 0 and 1 in DRAM; Redis holds chunk 2 (shared).
    assert actor.report("B", [H[:20]], []) == 20
    assert actor.report("A", [], [], TierDiff(CB, added={"dram": [chunk_key(0), chunk_key(1)],
                                                         "redis": [chunk_key(2)]})) == 0
    got = actor.match(H, ["A", "B"])
    assert got == PrefixMatch({"B": 20}, {"dram": {"A": 32}, "redis": {"A": 16}}, cached={"A": 0, "B": 20})
    assert actor.match(H, ["A", "B"], lower=False) == PrefixMatch({"B": 20}, {}, cached={"A": 0, "B": 20})
    assert actor.longest_match(H) == {"B": 20}                   # the device-only path is unchanged
    # B reaches chunk 2 only if it covers chunk 1: give B 32 device blocks
    actor.report("B", [H[:32]], [])
    assert actor.match(H, ["A", "B"]).lower == {"dram": {"A": 32}, "redis": {"A": 16, "B": 16}}
    assert actor.num_tier_chunks("dram", "A") == 2 and actor.num_tier_chunks("redis") == 1
    assert actor.retain_replicas(["B"]) == ["A"]                 # A held only tier chunks: still dropped
    assert actor.match(H, ["A", "B"]).lower == {"redis": {"B": 16}}
