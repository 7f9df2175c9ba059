"""Routing policies: PrefixAwarePolicy and CostAwarePolicy (Router v2), exact replica choices for given prefixes and loads."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing import (
    CostAwarePolicy,
    PrefixAwarePolicy,
    PrefixTree,
    ReplicaLoad,
    RouteDecision,
    make_policy,
)
from tierserve.routing.policy import KV_TIER_WEIGHTS


def loads(**kw):
    return [ReplicaLoad(rid, n) for rid, n in kw.items()]


def test_defaults_are_the_documented_ones():
    p = PrefixAwarePolicy()
    assert (p.abs_threshold, p.rel_threshold, p.tier_weights) == (4, 1.5, {"device": 1.0})


def test_longest_match_wins_when_balanced():
    p = PrefixAwarePolicy()
    d = p.choose({"a": 2, "b": 5, "c": 1}, loads(a=0, b=3, c=0))
    assert d == RouteDecision("b", 5, 5.0, "prefix")


def test_no_match_goes_to_least_loaded_then_lowest_id():
    p = PrefixAwarePolicy()
    assert p.choose({}, loads(a=3, b=1, c=2)) == RouteDecision("b", 0, 0.0, "no_match")
    assert p.choose({}, loads(c=1, b=1, a=2)).replica_id == "b"
    # Replicas in the tree but not among the candidates do not count.
    assert p.choose({"gone": 9}, loads(a=1, b=0)) == RouteDecision("b", 0, 0.0, "no_match")


@pytest.mark.parametrize("best_load,least_load,expected", [
    # abs gap 4 is not > 4: prefix kept.
    (4, 0, "prefix"),
    # abs gap 5 > 4 and 5 > 1.5*0: overridden.
    (5, 0, "least_loaded"),
    # abs gap 6 > 4 but 10 > 1.5*4 = 6: overridden.
    (10, 4, "least_loaded"),
    # abs gap 5 > 4 but 15 <= 1.5*10 = 15 (not strictly greater): prefix kept.
    (15, 10, "prefix"),
    # abs gap 6 > 4 and 16 > 15: overridden.
    (16, 10, "least_loaded"),
    # busy cluster, large absolute gap, small relative one: prefix kept.
    (40, 34, "prefix"),
])
def test_load_bound_needs_both_thresholds(best_load, least_load, expected):
    p = PrefixAwarePolicy(abs_threshold=4, rel_threshold=1.5)
    d = p.choose({"hit": 8}, loads(hit=best_load, idle=least_load))
    assert d.reason == expected
    assert d.replica_id == ("hit" if expected == "prefix" else "idle")
    assert d.matched_blocks == (8 if expected == "prefix" else 0)


def test_override_picks_least_loaded_even_if_it_matches_less():
    p = PrefixAwarePolicy(abs_threshold=2, rel_threshold=1.0)
    d = p.choose({"a": 10, "b": 3}, loads(a=9, b=5, c=4))
    # a (load 9) vs least c (4): 5 > 2 and 9 > 4 -> least loaded c, not the second-best match b.
    assert d == RouteDecision("c", 0, 0.0, "least_loaded")


def test_match_ties_go_to_lower_load_then_id():
    p = PrefixAwarePolicy()
    assert p.choose({"a": 4, "b": 4, "c": 4}, loads(a=2, b=1, c=1)).replica_id == "b"
    assert p.choose({"b": 4, "a": 4}, loads(b=0, a=0)).replica_id == "a"


def test_extreme_thresholds():
    # Pure longest-prefix: no load gap overrides.
    p = PrefixAwarePolicy(abs_threshold=math.inf)
    assert p.choose({"a": 1}, loads(a=1000, b=0)).replica_id == "a"
    # abs 0, rel 1.0: any strictly higher load than the least loaded overrides.
    q = PrefixAwarePolicy(abs_threshold=0, rel_threshold=1.0)
    assert q.choose({"a": 1}, loads(a=1, b=0)).replica_id == "b"
    assert q.choose({"a": 1}, loads(a=1, b=1)).replica_id == "a"


def test_rank_orders_every_replica_by_repeated_choice():
    p = PrefixAwarePolicy()
    ranked = p.rank({"a": 2, "b": 6, "c": 6}, loads(a=0, b=7, c=1, d=0))
    # c and b tie on 6 blocks; c has the lower load. Then b: 7 - 0 > 4 and 7 > 0 -> least loaded
    # among {a, b, d} is a (0, id a). Then b vs d: b still overloaded -> d. Then b.
    assert [(d.replica_id, d.reason) for d in ranked] == [
        ("c", "prefix"), ("a", "least_loaded"), ("d", "least_loaded"), ("b", "prefix")]


def test_choice_is_independent_of_input_order():
    p = PrefixAwarePolicy()
    base = loads(a=3, b=0, c=8, d=2)
    matches = {"a": 3, "c": 5, "d": 3}
    results = {p.choose(matches, list(perm)) for perm in itertools.permutations(base)}
    # c is overloaded (8 - 0 > 4, 8 > 0), so the least loaded b wins, whatever the order.
    assert results == {RouteDecision("b", 0, 0.0, "least_loaded")}


def test_lower_tier_weights_hook():
    # Device blocks count 1, DRAM blocks 0.5 (a DRAM hit still needs a copy up).
    p = PrefixAwarePolicy(tier_weights={"device": 1.0, "dram": 0.5})
    d = p.choose({"a": 2}, loads(a=0, b=0), lower_tier_matches={"dram": {"b": 6}})
    assert d == RouteDecision("b", 0, 3.0, "prefix")
    d = p.choose({"a": 4}, loads(a=0, b=0), lower_tier_matches={"dram": {"b": 6}})
    assert d == RouteDecision("a", 4, 4.0, "prefix")
    # The default policy knows only the device tier.
    with pytest.raises(InvalidParameterError) as e:
        PrefixAwarePolicy().choose({}, loads(a=0), lower_tier_matches={"dram": {"a": 1}})
    assert e.value.field == "lower_tier_matches"


def test_end_to_end_with_a_prefix_tree():
    bs = 4
    system = list(range(100, 132))                      # 8 blocks of shared system prompt
    doc_a = system + [1] * 16
    doc_b = system + [2] * 16
    tree = PrefixTree()
    tree.add_chain("r0", hash_blocks(doc_a, bs))        # 12 blocks
    tree.add_chain("r1", hash_blocks(doc_b, bs))        # 12 blocks
    tree.add_chain("r2", hash_blocks(system, bs)[:3])   # 3 blocks
    p = PrefixAwarePolicy()
    follow_up_b = hash_blocks(doc_b + [3] * 8, bs)
    assert tree.longest_match(follow_up_b) == {"r0": 8, "r1": 12, "r2": 3}
    assert p.choose(tree.longest_match(follow_up_b), loads(r0=0, r1=2, r2=0)) == \
        RouteDecision("r1", 12, 12.0, "prefix")
    assert p.choose(tree.longest_match(follow_up_b), loads(r0=0, r1=6, r2=1)) == \
        RouteDecision("r0", 8, 8.0, "least_loaded")


def test_short_match_routes_by_load_at_the_ratio_boundary():
    # One shared header block out of 50 must not pull a new conversation to a busy replica.
    p = PrefixAwarePolicy()
    assert p.min_match_ratio == 0.1
    assert p.choose({"a": 1}, loads(a=3, b=0), num_request_blocks=50) == \
        RouteDecision("b", 0, 0.0, "short_match")
    # Exactly at the ratio (5 of 50 = 0.1) the prefix still wins; one block less it does not.
    assert p.choose({"a": 5}, loads(a=3, b=0), num_request_blocks=50) == RouteDecision("a", 5, 5.0, "prefix")
    assert p.choose({"a": 4}, loads(a=3, b=0), num_request_blocks=50).reason == "short_match"
    # Without the request length, or with the check off, the old rule applies.
    assert p.choose({"a": 1}, loads(a=3, b=0)).replica_id == "a"
    assert PrefixAwarePolicy(min_match_ratio=0).choose(
        {"a": 1}, loads(a=3, b=0), num_request_blocks=50).replica_id == "a"
    # rank passes the length on: the short match is ranked by load (b, then a).
    assert [d.replica_id for d in p.rank({"a": 1}, loads(a=3, b=0), num_request_blocks=50)] == ["b", "a"]


def test_validation_names_the_field():
    for kwargs, field in [({"abs_threshold": -1}, "abs_threshold"),
                          ({"rel_threshold": 0.9}, "rel_threshold"),
                          ({"abs_threshold": math.nan}, "abs_threshold"),
                          ({"tier_weights": {"device": -1.0}}, "tier_weights"),
                          ({"min_match_ratio": 1.5}, "min_match_ratio")]:
        with pytest.raises(InvalidParameterError) as e:
            PrefixAwarePolicy(**kwargs)
        assert e.value.field == field
    p = PrefixAwarePolicy()
    with pytest.raises(InvalidParameterError) as e:
        p.choose({}, [])
    assert e.value.field == "loads"
    with pytest.raises(InvalidParameterError) as e:
        p.choose({}, [ReplicaLoad("a", 0), ReplicaLoad("a", 1)])
    assert e.value.field == "loads"
    with pytest.raises(InvalidParameterError) as e:
        ReplicaLoad("a", -1)
    assert e.value.field == "ongoing_requests"
    with pytest.raises(InvalidParameterError) as e:
        make_policy("random")
    assert e.value.field == "policy"
    assert isinstance(make_policy("prefix_aware", abs_threshold=2), PrefixAwarePolicy)


def test_policy_and_tree_import_neither_torch_nor_ray():
    code = ("import sys, tierserve.routing, tierserve.routing.policy, tierserve.routing.prefix_tree; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------- Router v2


def test_cost_policy_defaults_are_the_documented_ones():
    p = CostAwarePolicy()
    assert (p.block_size, p.token_budget, p.max_num_seqs, p.decode_tokens, p.tier_weights, p.min_match_ratio) == \
        (16, 2048, 64, 256.0, {"device": 1.0}, 0.1)
    assert make_policy("cost_aware").decode_tokens == 256.0


def test_cost_is_prefill_left_plus_queued_work_over_capacity():
    p = CostAwarePolicy()
    # 10-block request, 4 cached, 100 queued prompt tokens, 16 of 64 slots taken:
    # (16 * 6 + 100 + 256 * 16) / 2048 = 196/2048 + 2
    assert p.cost(ReplicaLoad("a", 16, pending_prefill_tokens=100), 4.0, 10) == 196 / 2048 + 2.0
    # A replica reporting its own capacity is normalised by it; its slot count only binds when full.
    assert p.cost(ReplicaLoad("a", 16, 100, max_num_seqs=32, token_budget=512), 4.0, 10) == (196 + 4096) / 512
    assert p.cost(ReplicaLoad("a", 3, 0, max_num_seqs=4), 4.0, 10) == (96 + 3 * 256) / 2048   # a slot is free
    assert p.cost(ReplicaLoad("a", 4, 0, max_num_seqs=4), 4.0, 10) == (96 + 5 * 256) / 2048   # waits for one
    assert p.cost(ReplicaLoad("a", 6, 0, max_num_seqs=4), 4.0, 10) == (96 + 9 * 256) / 2048   # for three


def test_hot_replica_keeps_a_long_match_until_three_requests_more_and_loses_at_four():
    # Module doc example: 55 cached blocks save 880 tokens; each request in flight costs 256.
    p = CostAwarePolicy()
    for k, winner in [(0, "hot"), (1, "hot"), (3, "hot"), (4, "idle"), (9, "idle")]:
        d = p.choose({"hot": 55}, loads(hot=k, idle=0), num_request_blocks=60)
        assert d.replica_id == winner, k
    d = p.choose({"hot": 55}, loads(hot=3, idle=0), num_request_blocks=60)
    assert d == RouteDecision("hot", 55, 55.0, "prefix", 80 / 2048 + 3 / 8)
    d = p.choose({"hot": 55}, loads(hot=4, idle=0), num_request_blocks=60)
    assert d == RouteDecision("idle", 0, 0.0, "least_loaded", 960 / 2048)


def test_short_shared_header_never_outweighs_one_request_in_flight():
    p = CostAwarePolicy()
    d = p.choose({"a": 2}, loads(a=1, b=0), num_request_blocks=50)
    assert (d.replica_id, d.reason) == ("b", "short_match")
    # the cost alone decides it too (check off): 32 tokens saved against 256 for the request in flight
    d = CostAwarePolicy(min_match_ratio=0).choose({"a": 2}, loads(a=1, b=0), num_request_blocks=50)
    assert (d.replica_id, d.reason) == ("b", "least_loaded")
    # Both idle: a header under min_match_ratio (0.1 x 50 = 5 blocks) counts as no match, so the replica
    # caching less takes the new prompt (prompts spread); at 5 blocks the match counts and wins.
    idle = [ReplicaLoad("a", 0, cached_blocks=60), ReplicaLoad("b", 0, cached_blocks=0)]
    d = p.choose({"a": 2}, idle, num_request_blocks=50)
    assert d == RouteDecision("b", 0, 0.0, "short_match", 16 * 50 / 2048)
    assert p.choose({"a": 4}, idle, num_request_blocks=50).reason == "short_match"
    d = p.choose({"a": 5}, idle, num_request_blocks=50)
    assert (d.replica_id, d.reason, d.cost) == ("a", "prefix", 16 * 45 / 2048)
    # without the request's length, or with the check off, the header is a free win
    assert p.choose({"a": 2}, idle).replica_id == "a"
    assert CostAwarePolicy(min_match_ratio=0).choose({"a": 2}, idle, num_request_blocks=50).replica_id == "a"


def test_queued_prefill_moves_a_request_off_a_replica_before_its_queue_grows():
    # Same ongoing count (1 each); a holds 20 blocks but has 1000 prompt tokens waiting to prefill.
    p = CostAwarePolicy()
    hot = ReplicaLoad("a", 1, pending_prefill_tokens=1000)
    idle = ReplicaLoad("b", 1, pending_prefill_tokens=0)
    # a: (16*10 + 1000)/2048 ; b: 16*30/2048 -> 1160 > 480: b.
    assert p.choose({"a": 20}, [hot, idle], num_request_blocks=30) == \
        RouteDecision("b", 0, 0.0, "least_loaded", 480 / 2048 + 1 / 8)
    # With 300 queued tokens a wins: 460 < 480.
    d = p.choose({"a": 20}, [ReplicaLoad("a", 1, pending_prefill_tokens=300), idle], num_request_blocks=30)
    assert (d.replica_id, d.reason, d.cost) == ("a", "prefix", 460 / 2048 + 1 / 8)


def test_capacity_normalises_load():
    # Few slots do not inflate the work of a request in flight: 3 of 4 taken weigh as 3 of 64 (the benchmark's
    # replicas run 4 sequences): a 55-block match stays, as in the 64-slot example above.
    p = CostAwarePolicy(decode_tokens=256.0)
    few = [ReplicaLoad("hot", 3, max_num_seqs=4), ReplicaLoad("idle", 0, max_num_seqs=4)]
    assert p.choose({"hot": 55}, few, num_request_blocks=60).replica_id == "hot"
    # All 4 taken: the request would wait for one to finish (3 + 2 = 5 answers of work > 880 saved): it moves.
    full = [ReplicaLoad("hot", 4, max_num_seqs=4), ReplicaLoad("idle", 0, max_num_seqs=4)]
    assert p.choose({"hot": 55}, full, num_request_blocks=60) == \
        RouteDecision("idle", 0, 0.0, "least_loaded", 960 / 2048)
    # 8 requests in flight on a full 8-slot replica weigh one answer more than 8 on one with free slots.
    tight, roomy = ReplicaLoad("tight", 8, max_num_seqs=8), ReplicaLoad("roomy", 8)
    assert p.choose({}, [tight, roomy], num_request_blocks=4) == \
        RouteDecision("roomy", 0, 0.0, "no_match", (64 + 8 * 256) / 2048)
    assert p.cost(tight, 0.0, 4) == (64 + 9 * 256) / 2048
    # A larger token budget halves the prefill term: 2048 tokens of queue at 4096 budget cost 0.5.
    wide = ReplicaLoad("wide", 0, pending_prefill_tokens=2048, token_budget=4096)
    narrow = ReplicaLoad("narrow", 0, pending_prefill_tokens=1536)
    assert p.choose({}, [wide, narrow], num_request_blocks=4).replica_id == "wide"


def test_cost_policy_lower_tiers_and_no_match():
    p = CostAwarePolicy(tier_weights=KV_TIER_WEIGHTS)
    # a: 10 blocks in DRAM (score 8.0); b: 6 device blocks (6.0); idle both: a (less work left).
    d = p.choose({"b": 6}, loads(a=0, b=0), lower_tier_matches={"dram": {"a": 10}}, num_request_blocks=12)
    assert (d.replica_id, d.score, d.matched_blocks, d.reason) == ("a", 8.0, 0, "prefix")
    assert d.cost == 16 * 4 / 2048
    # 9 device blocks beat it.
    assert p.choose({"b": 9}, loads(a=0, b=0), lower_tier_matches={"dram": {"a": 10}},
                    num_request_blocks=12).replica_id == "b"
    # No match anywhere: least loaded, then lowest id.
    assert p.choose({}, loads(c=1, b=1, a=2), num_request_blocks=5) == \
        RouteDecision("b", 0, 0.0, "no_match", 80 / 2048 + 1 / 8)
    with pytest.raises(InvalidParameterError) as e:
        CostAwarePolicy().choose({}, loads(a=0), lower_tier_matches={"dram": {"a": 1}})
    assert e.value.field == "lower_tier_matches"


def test_cost_choice_does_not_depend_on_request_length():
    p = CostAwarePolicy()
    cases = [({"a": 7, "b": 3}, loads(a=2, b=0, c=1)), ({"a": 30}, loads(a=2, b=0)), ({}, loads(a=1, b=0))]
    for matches, ls in cases:
        chosen = {p.choose(matches, ls, num_request_blocks=n).replica_id for n in (None, 30, 31, 100)}
        assert len(chosen) == 1, (matches, chosen)
    # rank orders every replica once, cheapest first (a: 16*0 + 1 req = 0.125; c: 16*30/2048 + 0.125;
    # b: 16*30/2048 + 0 -> b 0.234, c 0.359).
    assert [d.replica_id for d in p.rank({"a": 30}, loads(a=1, b=0, c=1), num_request_blocks=30)] == \
        ["a", "b", "c"]


def test_cost_policy_validation_names_the_field():
    for kwargs, field in [({"block_size": 0}, "block_size"), ({"token_budget": 0}, "token_budget"),
                          ({"max_num_seqs": 1.5}, "max_num_seqs"), ({"decode_tokens": -1.0}, "decode_tokens"),
                          ({"decode_tokens": math.inf}, "decode_tokens"),
                          ({"tier_weights": {"dram": math.nan}}, "tier_weights"),
                          ({"min_match_ratio": 1.5}, "min_match_ratio")]:
        with pytest.raises(InvalidParameterError) as e:
            CostAwarePolicy(**kwargs)
        assert e.value.field == field
    for kwargs, field in [({"pending_prefill_tokens": -1}, "pending_prefill_tokens"),
                          ({"cached_blocks": -1}, "cached_blocks"),
                          ({"max_num_seqs": 0}, "max_num_seqs"), ({"token_budget": 0}, "token_budget")]:
        with pytest.raises(InvalidParameterError) as e:
            ReplicaLoad("a", 0, **kwargs)
        assert e.value.field == field


def test_equal_loads_go_to_the_replica_caching_least():
    """Cold prompts spread over idle replicas: among equally loaded candidates the one whose cache holds the
    fewest blocks wins, then the lower id (before, always the lower id: one replica could take every prompt)."""
    idle = [ReplicaLoad("a", 0, cached_blocks=55), ReplicaLoad("b", 0, cached_blocks=7),
            ReplicaLoad("c", 0, cached_blocks=7), ReplicaLoad("d", 0, cached_blocks=12)]
    for p in (PrefixAwarePolicy(), CostAwarePolicy()):
        assert p.choose({}, idle, num_request_blocks=5).replica_id == "b"
        assert [d.replica_id for d in p.rank({}, idle, num_request_blocks=5)] == ["b", "c", "d", "a"]
        # load comes first: an empty replica with a request in flight loses to an idle full one
        busy = [ReplicaLoad("a", 0, cached_blocks=55), ReplicaLoad("b", 1, cached_blocks=0)]
        assert p.choose({}, busy, num_request_blocks=5).replica_id == "a"
    # a match still wins over an empty cache
    assert CostAwarePolicy().choose({"a": 5}, idle, num_request_blocks=5).replica_id == "a"
    assert PrefixAwarePolicy().choose({"a": 5}, idle, num_request_blocks=5).replica_id == "a"
    # equal prefix scores: load, then the smaller cache (d holds 12 blocks against a's 55)
    d = PrefixAwarePolicy().choose({"a": 3, "d": 3}, idle, num_request_blocks=5)
    assert (d.replica_id, d.reason) == ("d", "prefix")
    c = CostAwarePolicy().choose({"a": 3, "d": 3}, idle, num_request_blocks=5)
    assert (c.replica_id, c.reason, c.cost) == ("d", "prefix", 16 * 2 / 2048)
