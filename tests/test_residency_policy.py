"""Residency policies over a routing trace (tierserve/offload/residency_policy.py), worked by hand.

One layer, 4 experts, top-2, capacity 2, calibration ranking [0, 1, 2, 3]; rows [2,3], [2,0], [3,1]:
- static holds {0, 1}: cold 2 + 1 + 1 = 4;
- lru starts {0, 1} (0 most recent): [2,3] both cold -> holds {2, 3}; [2,0]: 0 cold -> holds {2, 0};
  [3,1]: both cold: 2 + 1 + 2 = 5;
- prefetch: step 1 holds static {0,1}: 2 cold; step 2 holds the previous step's {2, 3}: 0 cold; step 3 holds
  {0, 2}: both cold: 2 + 1 + 2 = 5.
- ring (r = min(2, 2 // 2) = 1 slot, resident {0}): step 1 holds {0}: 2 cold; step 2's ring takes 2 (the
  previous step's [2, 3], one slot, lower id first): 0 cold; step 3's ring keeps 2: 2 cold: 4.
And a locality sequence where prefetch and LRU beat the static set (capacity 1): rows [2], [2], [2], [3],
[3] -> static 5, lru 2, prefetch 2; with capacity 2 (ring: resident {0} and 1 slot) -> ring 2.
"""

from __future__ import annotations

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.offload.residency_policy import cold_hit_rate, layer_cold_hits, static_ranking
from tierserve.offload.routing_trace import RoutingTrace

RANK = [0, 1, 2, 3]


def test_static_ranking_ties_to_lower_id():
    assert static_ranking([[3, 1], [1, 2], [3, 0]], 4) == [1, 3, 0, 2]


@pytest.mark.parametrize("policy,cold", [("static", 4), ("lru", 5), ("prefetch", 5), ("ring", 4)])
def test_hand_worked_top2(policy, cold):
    assert layer_cold_hits([[2, 3], [2, 0], [3, 1]], RANK, 2, policy) == cold


@pytest.mark.parametrize("policy,cold", [("static", 5), ("lru", 2), ("prefetch", 2)])
def test_locality_favours_dynamic_policies(policy, cold):
    assert layer_cold_hits([[2], [2], [2], [3], [3]], RANK, 1, policy) == cold


def test_ring_follows_the_previous_step():
    assert layer_cold_hits([[2], [2], [2], [3], [3]], RANK, 2, "ring") == 2
    assert layer_cold_hits([[2], [2], [2], [3], [3]], RANK, 1, "ring") == 5  # no slot at capacity 1: static


def test_rate_over_layers_and_ranges():
    calib = [[0, 1], [0, 1]]
    trace = RoutingTrace(4, 2, [calib + [[2, 3], [2, 0], [3, 1]], calib + [[0, 1], [0, 1], [0, 1]]])
    # layer 0: 4 static cold hits of 6; layer 1: none of 6
    assert cold_hit_rate(trace, 2, "static", range(0, 2), range(2, 5)) == 4 / 12
    assert cold_hit_rate(trace, 4, "lru", range(0, 2), range(2, 5)) == 0.0
    with pytest.raises(InvalidParameterError):
        cold_hit_rate(trace, 5, "static", range(0, 2), range(2, 5))
    with pytest.raises(InvalidParameterError):
        layer_cold_hits([[0, 1]], RANK, 2, "oracle")
