"""Expert placement, sharding and promotions: exact expectations and a brute-force optimum."""

from __future__ import annotations

import itertools
import random

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.offload.placement import (Placement, Swap, apply_swaps, plan_placement, plan_promotions,
                                     shard_cold)


def test_floor_then_highest_next_count():
    counts = [[5, 9, 1, 7],   # ranked 1, 3, 0, 2
              [2, 2, 8, 0],   # ranked 2, 0, 1, 3
              [6, 6, 6, 6]]   # ranked 0, 1, 2, 3
    p = plan_placement(counts, budget=6, per_layer_floor=1)
    # floor: L0 {1}, L1 {2}, L2 {0}; next candidates: L0 e3 (7), L1 e0 (2), L2 e1 (6)
    # -> L0 e3; then L0 e0 (5) vs L2 e1 (6) -> L2 e1; then L0 e0 (5) vs L2 e2 (6) -> L2 e2
    assert p.resident == ((1, 3), (2,), (0, 1, 2))
    assert p.num_resident == 6
    assert p.cold(1) == (0, 1, 3)
    assert p.fraction_resident == 0.5


def test_ties_go_to_the_emptier_layer_then_lower_layer_and_lower_expert():
    counts = [[3, 3, 3], [3, 3, 3]]
    assert plan_placement(counts, budget=3, per_layer_floor=0).resident == ((0, 1), (0,))
    assert plan_placement(counts, budget=4, per_layer_floor=0).resident == ((0, 1), (0, 1))
    assert plan_placement(counts, budget=3, per_layer_floor=1).resident == ((0, 1), (0,))
    # uniform counts (no usage yet) over 3 layers: the budget spreads evenly
    assert plan_placement([[0] * 4] * 3, budget=7).resident == ((0, 1, 2), (0, 1), (0, 1))
    # a higher count still wins over an emptier layer
    assert plan_placement([[5, 5, 1], [1, 1, 1]], budget=3).resident == ((0, 1), (0,))


def test_budget_covers_everything_and_zero_budget():
    counts = [[1, 2], [3, 4]]
    assert plan_placement(counts, budget=100).resident == ((0, 1), (0, 1))
    assert plan_placement(counts, budget=0).resident == ((), ())


def test_byte_budget_closes_layers_that_do_not_fit():
    counts = [[10, 9], [8, 7]]
    sizes = [[5, 5], [2, 2]]
    # L0 e0 (5 bytes), then L0 e1 (9) needs 5 more -> 10 > 8: layer 0 closes; then L1 e0, e1 (2+2) -> 9 > 8? no:
    # spent 5 + 2 = 7, then L1 e1 needs 2 -> 9 > 8 -> closed.
    p = plan_placement(counts, budget=8, expert_bytes=sizes)
    assert p.resident == ((0,), (0,))


def test_errors_name_fields():
    with pytest.raises(InvalidParameterError) as e:
        plan_placement([[1, 2], [3, 4]], budget=1, per_layer_floor=1)
    assert e.value.field == "budget"
    with pytest.raises(InvalidParameterError) as e:
        plan_placement([[1, 2]], budget=2, per_layer_floor=3)
    assert e.value.field == "per_layer_floor"
    with pytest.raises(InvalidParameterError):
        plan_placement([[1, -2]], budget=2)


def _brute_force_best(counts, budget, floor):
    best = -1
    choices = [[c for n in range(floor, len(r) + 1) for c in itertools.combinations(range(len(r)), n)]
               for r in counts]
    for combo in itertools.product(*choices):
        if sum(len(c) for c in combo) > budget:
            continue
        best = max(best, sum(counts[layer][e] for layer, c in enumerate(combo) for e in c))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_greedy_matches_brute_force_optimum(seed):
    rng = random.Random(seed)
    layers, experts = rng.randint(1, 3), rng.randint(2, 4)
    counts = [[rng.randint(0, 6) for _ in range(experts)] for _ in range(layers)]
    floor = rng.randint(0, 1)
    budget = rng.randint(floor * layers, layers * experts)
    p = plan_placement(counts, budget, floor)
    total = sum(counts[layer][e] for layer, res in enumerate(p.resident) for e in res)
    assert total == _brute_force_best(counts, budget, floor)
    assert all(len(r) >= floor for r in p.resident)
    assert p.num_resident == min(budget, layers * experts)


def test_shard_cold_balances_bytes_and_layer_traffic():
    counts = [[9, 8, 7, 6, 5, 4], [1, 2, 3, 4, 5, 6]]
    p = Placement(((0, 1), (5, 4)), (6, 6))
    shards = shard_cold(p, ["a", "b"], counts)
    # order by (-count, layer, expert): L0e2 7, L0e3 6, L0e4 5, L0e5 4, L1e3 4, L1e2 3, L1e1 2, L1e0 1;
    # each to the host with fewest experts, then least traffic in that layer, then lower index:
    # e2->a; e3->b; e4: 1/1 held, L0 traffic a 7 > b 6 -> b; e5: a holds fewer -> a;
    # L1e3: 2/2, 0/0 -> a; L1e2 -> b; L1e1: 3/3, L1 traffic a 4 > b 3 -> b; L1e0 -> a
    assert shards == {"a": [(0, 2), (0, 5), (1, 0), (1, 3)], "b": [(0, 3), (0, 4), (1, 1), (1, 2)]}
    for layer in (0, 1):  # per-layer traffic is balanced exactly here: 11/11 and 5/5
        assert (sum(counts[layer][e] for lay, e in shards["a"] if lay == layer)
                == sum(counts[layer][e] for lay, e in shards["b"] if lay == layer))
    assert shard_cold(Placement.all_resident([3]), []) == {}
    with pytest.raises(InvalidParameterError):
        shard_cold(p, [])


def test_promotions_min_gain_and_cap():
    counts = [[10, 1, 50, 2], [5, 40, 6, 30]]
    p = Placement(((0, 1), (0, 2)), (4, 4))
    # L0: cold by count 2 (50), 3 (2); resident by count 1 (1), 0 (10): gains 49, -8
    # L1: cold 1 (40), 3 (30); resident 0 (5), 2 (6): gains 35, 24
    assert plan_promotions(p, counts, min_gain=20, max_swaps=10) == [
        Swap(0, 2, 1, 49), Swap(1, 1, 0, 35), Swap(1, 3, 2, 24)]
    assert plan_promotions(p, counts, min_gain=30, max_swaps=10) == [Swap(0, 2, 1, 49), Swap(1, 1, 0, 35)]
    assert plan_promotions(p, counts, min_gain=20, max_swaps=2) == [Swap(0, 2, 1, 49), Swap(1, 1, 0, 35)]
    assert plan_promotions(p, counts, min_gain=50, max_swaps=10) == []
    after = apply_swaps(p, plan_promotions(p, counts, 20, 10))
    assert after.resident == ((0, 2), (1, 3))
    assert plan_promotions(after, counts, min_gain=1, max_swaps=10) == []
    with pytest.raises(InvalidParameterError):
        apply_swaps(after, [Swap(0, 2, 1, 49)])
