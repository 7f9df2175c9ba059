"""PrefixAwareRequestRouter with ``kv_tiers`` inside a real Ray Serve app (local Ray, two replicas, CPU).

Replica X holds a prompt's two chunks in DRAM (reported to the tree actor as a TierDiff), replica Y
holds its first 3 device blocks: X scores 0.8 * 4 = 3.2 > 3 and serves it; once Y caches 4 device
blocks (4 > 3.2) Y serves it.
"""

from __future__ import annotations

import pytest
import ray

from router_stub import stub_router_app
from tierserve.cache.tiers.chunk import chunk_keys
from tierserve.cache.prefix_hash import hash_blocks
from tierserve.routing.serve_router import routing_kwargs
from tierserve.routing.tier_index import TierDiff

BS, CB = 4, 2
APP = "tier-routing-test"
PROMPT = list(range(300, 316))          # 4 blocks = 2 chunks


def own_tokens(replica_id: str) -> list[int]:
    data = list(replica_id.encode())[:8]
    return data + [0] * (8 - len(data))


@pytest.fixture(scope="module")
def tier_app(ray_session):  # the session-wide Ray + Serve (tests/ray_fixtures.py)
    yield from stub_router_app(APP, {"match_timeout_s": 2.0, "kv_tiers": ["dram", "redis"],
                                                   "inflight_ttl_s": 0}, own_tokens, BS)


def test_dram_chunks_count_as_weighted_partial_matches(tier_app):
    handle, tree = tier_app
    x, y = sorted(ray.get(tree.replicas.remote()))
    hashes = hash_blocks(PROMPT, BS)
    ray.get(tree.report.remote(x, [], [], TierDiff(CB, added={"dram": chunk_keys(PROMPT, BS, CB)})))
    ray.get(tree.report.remote(y, [hashes[:3]], []))
    found = ray.get(tree.match.remote(hashes, [x, y]))
    assert (found.device, found.lower) == ({y: 3}, {"dram": {x: 4}})
    assert found.cached == {r: ray.get(tree.num_blocks.remote(r)) for r in (x, y)}  # the policies' tie-break
    request = PROMPT + [9] * 4                                          # 5 blocks
    for _ in range(3):
        assert handle.remote("hi", **routing_kwargs(request, BS)).result(timeout_s=30) == x
    ray.get(tree.report.remote(y, [hashes], []))                         # Y: 4 device blocks now
    for _ in range(3):
        assert handle.remote("hi", **routing_kwargs(request, BS)).result(timeout_s=30) == y
