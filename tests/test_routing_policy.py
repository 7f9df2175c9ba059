"""PrefixAwarePolicy: exact replica choices for given prefixes and loads."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing import (
    PrefixAwarePolicy,
    PrefixTree,
    ReplicaLoad,
    RouteDecision,
    make_policy,
)


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
