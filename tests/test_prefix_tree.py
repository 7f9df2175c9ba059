"""PrefixTree: exact match counts, diffs, pruning, the LRU cap, and a brute-force cross-check."""

from __future__ import annotations

import random

import pytest

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing.prefix_tree import PrefixTree

BS = 4


def chain(tokens):
    return hash_blocks(tokens, BS)


# Three prompts: B shares A's first 2 blocks, C shares nothing.
A = chain(list(range(0, 16)))                    # 4 blocks
B = chain(list(range(0, 8)) + [99] * 8)          # 4 blocks, first 2 == A's
C = chain([7] * 12)                              # 3 blocks


def test_shared_prefix_is_one_path():
    assert A[:2] == B[:2] and A[2] != B[2]
    t = PrefixTree()
    t.add_chain("r1", A)
    t.add_chain("r2", B)
    assert t.num_blocks() == 6          # 2 shared + 2 + 2
    assert t.num_blocks("r1") == 4 and t.num_blocks("r2") == 4
    assert t.holders(A[0]) == {"r1", "r2"}
    assert t.holders(A[3]) == {"r1"}


def test_longest_match_exact_counts():
    t = PrefixTree()
    t.add_chain("r1", A)
    t.add_chain("r2", B[:3])
    t.add_chain("r3", C)
    assert t.longest_match(A) == {"r1": 4, "r2": 2}
    assert t.longest_match(B) == {"r1": 2, "r2": 3}
    assert t.longest_match(C) == {"r3": 3}
    assert t.longest_match(C[:1]) == {"r3": 1}
    assert t.longest_match(chain([5] * 8)) == {}
    assert t.longest_match([]) == {}
    # A request longer than anything cached matches up to what is cached.
    assert t.longest_match(chain(list(range(0, 24)))) == {"r1": 4, "r2": 2}


def test_gap_stops_the_match():
    t = PrefixTree()
    t.add_chain("r1", A)
    t.evict("r1", [A[1]])
    # r1 still holds blocks 0, 2, 3 but only block 0 is a usable prefix.
    assert t.holders(A[2]) == {"r1"}
    assert t.longest_match(A) == {"r1": 1}


def test_evict_prunes_unheld_leaves_and_is_idempotent():
    t = PrefixTree()
    t.add_chain("r1", A)
    t.add_chain("r2", B)
    assert t.evict("r1", [A[3], A[2]]) == 2
    assert t.num_blocks() == 4           # A's own tail is gone, shared + B's tail remain
    assert t.evict("r1", [A[3]]) == 0    # already gone
    assert t.evict("nobody", A) == 0
    assert t.longest_match(A) == {"r1": 2, "r2": 2}
    # Evicting r2's whole chain leaves r1's two blocks only.
    assert t.evict("r2", B) == 4
    assert t.num_blocks() == 2 and t.replicas() == ["r1"]
    assert t.drop_replica("r1") == 2
    assert t.num_blocks() == 0 and t.replicas() == []


def test_interior_node_kept_while_a_descendant_is_held():
    t = PrefixTree()
    t.add_chain("r1", A)
    t.evict("r1", A[:3])                 # only the leaf block remains held
    assert t.num_blocks() == 4           # its ancestors stay as (unheld) path nodes
    assert t.longest_match(A) == {}      # but nobody matches block 0
    t.evict("r1", A[3:])
    assert t.num_blocks() == 0


def test_readding_is_idempotent():
    t = PrefixTree()
    t.add_chain("r1", A)
    t.add_chain("r1", A[:2])
    t.add_chain("r1", A)
    assert t.num_blocks("r1") == 4 and t.num_blocks() == 4


def test_lru_cap_trims_chain_tails_first():
    t = PrefixTree(max_blocks_per_replica=5)
    assert t.add_chain("r1", A) == []
    # Touch order after A: A3, A2, A1, A0 (A0 most recent).
    evicted = t.add_chain("r1", C)       # 7 blocks > 5: the two oldest go, A's tail
    assert evicted == [A[3], A[2]]
    assert t.longest_match(A) == {"r1": 2}
    assert t.longest_match(C) == {"r1": 3}
    assert t.blocks_of("r1") == [A[1], A[0], C[2], C[1], C[0]]
    # Re-reporting A's head refreshes it: the next overflow takes C's tail instead.
    t.add_chain("r1", A[:1])
    assert t.blocks_of("r1") == [A[1], C[2], C[1], C[0], A[0]]
    # B[:3] = A0, A1, B2: one new block -> 6 > 5; A1 and A0 are refreshed, so C's tail goes.
    assert t.add_chain("r1", B[:3]) == [C[2]]
    assert t.blocks_of("r1") == [C[1], C[0], B[2], A[1], A[0]]
    assert t.longest_match(C) == {"r1": 2}
    assert t.longest_match(B) == {"r1": 3}


def test_cap_is_per_replica():
    t = PrefixTree(max_blocks_per_replica=2)
    t.add_chain("r1", A[:2])
    t.add_chain("r2", A[:2])
    t.add_chain("r2", C[:1])
    assert t.longest_match(A) == {"r1": 2, "r2": 1}


def test_rejects_bad_input_without_mutating():
    t = PrefixTree()
    t.add_chain("r1", A)
    with pytest.raises(InvalidParameterError) as e:
        t.add_chain("r1", [b"short"])
    assert e.value.field == "hashes"
    with pytest.raises(InvalidParameterError) as e:
        t.add_chain("r2", [C[0], A[2]])       # A[2] lives under A[1], not under C[0]
    assert "different parent" in str(e.value)
    assert t.num_blocks() == 4 and t.replicas() == ["r1"]
    with pytest.raises(InvalidParameterError) as e:
        t.add_chain("", A)
    assert e.value.field == "replica_id"
    with pytest.raises(InvalidParameterError) as e:
        PrefixTree(max_blocks_per_replica=0)
    assert e.value.field == "max_blocks_per_replica"


def _reference_match(held: dict[str, set[bytes]], hashes: list[bytes]) -> dict[str, int]:
    out = {}
    for replica, blocks in held.items():
        n = 0
        while n < len(hashes) and hashes[n] in blocks:
            n += 1
        if n:
            out[replica] = n
    return out


def test_matches_brute_force_over_random_diffs():
    rng = random.Random(1234)
    # Prompts that share prefixes: random walks over a small alphabet.
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(4, 40))] for _ in range(40)]
    chains = [chain(p) for p in prompts]
    chains = [c for c in chains if c]
    replicas = ["r0", "r1", "r2", "r3"]
    t = PrefixTree()
    held: dict[str, set[bytes]] = {r: set() for r in replicas}
    for _ in range(600):
        r = rng.choice(replicas)
        op = rng.random()
        if op < 0.55:
            c = rng.choice(chains)
            c = c[:rng.randrange(1, len(c) + 1)]
            t.add_chain(r, c)
            held[r].update(c)
        elif op < 0.95:
            victims = rng.sample(sorted(held[r]), k=min(len(held[r]), rng.randrange(0, 4))) if held[r] else []
            assert t.evict(r, victims) == len(victims)
            held[r].difference_update(victims)
        else:
            assert t.drop_replica(r) == len(held[r])
            held[r] = set()
        query = rng.choice(chains)
        assert t.longest_match(query) == _reference_match(held, query)
        union = set().union(*held.values())
        # Pruning is exact: the tree holds the held blocks and their ancestors, nothing else.
        expected_nodes = {h for c in chains for i in range(len(c)) if c[i] in union for h in c[:i + 1]}
        assert t.num_blocks() == len(expected_nodes)
        assert {r for r in replicas if held[r]} == set(t.replicas())
        for r2 in replicas:
            assert t.num_blocks(r2) == len(held[r2])
    for r in replicas:
        t.drop_replica(r)
    assert t.num_blocks() == 0
