"""Router: a lower-tier KV hit counts as a weighted partial match (routing/policy.py KV_TIER_WEIGHTS)."""

from __future__ import annotations

import pytest

from tierserve.cache.tiers.stats import KVTierStats
from tierserve.errors import InvalidParameterError
from tierserve.routing.policy import KV_TIER_WEIGHTS, PrefixAwarePolicy, ReplicaLoad


def test_lower_tier_hits_are_weighted_partial_matches():
    policy = PrefixAwarePolicy(tier_weights=KV_TIER_WEIGHTS)
    loads = [ReplicaLoad("a", 0), ReplicaLoad("b", 0)]
    # a: 10 blocks in DRAM (8.0) beats b: 6 device blocks (6.0)
    d = policy.choose({"b": 6}, loads, {"dram": {"a": 10}})
    assert (d.replica_id, d.score, d.matched_blocks, d.reason) == ("a", 8.0, 0, "prefix")
    # ... but loses to 9 device blocks (9.0)
    d = policy.choose({"b": 9}, loads, {"dram": {"a": 10}})
    assert (d.replica_id, d.score) == ("b", 9.0)
    # disk 0.5 and redis 0.3: a = 4*0.5 + 10*0.3 = 5.0, b = 10*0.3 + 1 = 4.0
    d = policy.choose({"b": 1}, loads, {"disk": {"a": 4}, "redis": {"a": 10, "b": 10}})
    assert (d.replica_id, d.score) == ("a", 5.0)
    # a Redis hit alone (same for every replica) is a match, not "no_match": ties go to the least loaded
    loads2 = [ReplicaLoad("a", 2), ReplicaLoad("b", 1)]
    d = policy.choose({}, loads2, {"redis": {"a": 10, "b": 10}})
    assert (d.replica_id, d.score, d.reason) == ("b", 3.0, "prefix")
    with pytest.raises(InvalidParameterError):
        PrefixAwarePolicy().choose({}, loads, {"dram": {"a": 1}})  # default weights know only "device"


def test_tier_stats_and_metrics_sum_over_replicas():
    from tierserve.server.metrics import MetricsSnapshot, render_prometheus

    a = MetricsSnapshot("m", kv_tiers=KVTierStats(hits={"dram": 2, "redis": 1}, bytes_loaded={"dram": 10},
                                                  failures={"redis": 3}, load_seconds=0.5))
    b = MetricsSnapshot("m", kv_tiers=KVTierStats(hits={"dram": 3}, load_seconds=0.25))
    text = render_prometheus([a, b]).decode()
    assert 'tierserve:kv_tier_hits_total{model_name="m",tier="dram"} 5.0' in text
    assert 'tierserve:kv_tier_hits_total{model_name="m",tier="redis"} 1.0' in text
    assert 'tierserve:kv_tier_bytes_loaded_total{model_name="m",tier="dram"} 10.0' in text
    assert 'tierserve:kv_tier_failures_total{model_name="m",tier="redis"} 3.0' in text
    assert 'tierserve:kv_tier_load_seconds_total{model_name="m"} 0.75' in text
    assert "kv_tier" not in render_prometheus([MetricsSnapshot("m")]).decode()
