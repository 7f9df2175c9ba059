"""Draft-tree bookkeeping (spec_decode/tree.py) and the greedy tree walk (tree_verifier.py), exact values.

The tree used throughout (flattened breadth first; node: token):

    root ─ 0:10 ─ 2:30 ─ 4:50
         │      └ 3:40
         └ 1:20 ─ 5:60
"""

from __future__ import annotations

import pytest
import torch

from tierserve.engine.sampler import Sampler
from tierserve.engine.spec_decode.tree import Candidate, DraftTree, select_tree
from tierserve.engine.spec_decode.tree_verifier import verify_tree
from tierserve.sampling_params import SamplingParams

TREE = DraftTree((10, 20, 30, 40, 50, 60), (-1, -1, 0, 0, 2, 1))
V = 64


def test_depths_children_paths_positions():
    assert TREE.depths == (1, 1, 2, 2, 3, 2) and TREE.depth == 3 and not TREE.is_chain
    assert TREE.children(-1) == [0, 1] and TREE.children(0) == [2, 3] and TREE.children(4) == []
    assert TREE.path(4) == [0, 2, 4] and TREE.path(5) == [1, 5] and TREE.path(-1) == []
    assert TREE.positions(100) == [100, 101, 101, 102, 102, 103, 102]
    assert DraftTree.chain([7, 8, 9]).is_chain and DraftTree.chain([7, 8, 9]).positions(5) == [5, 6, 7, 8]


def test_ancestor_bits_exact():
    # row r = 0 root, 1 + i node i; bit j = row j visible
    assert TREE.ancestor_bits() == [0b1, 0b11, 0b101, 0b1011, 0b10011, 0b101011, 0b1000101]
    assert DraftTree.chain([1, 2, 3]).ancestor_bits() == [0b1, 0b11, 0b111, 0b1111]


def test_prefix_is_a_tree_and_compaction_moves():
    assert TREE.prefix(3) == DraftTree((10, 20, 30), (-1, -1, 0)) and TREE.prefix(9) is TREE
    assert TREE.compaction([0, 2, 4]) == [(3, 2), (5, 3)]  # rows 1, 3, 5 -> rows 1, 2, 3
    assert TREE.compaction([1, 5]) == [(2, 1), (6, 2)]
    assert TREE.compaction([0]) == [] and TREE.compaction([]) == []


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="parent"):
        DraftTree((1, 2), (-1, 1))
    with pytest.raises(ValueError, match="at most 62"):
        DraftTree.chain(list(range(63)))


def test_select_tree_keeps_the_best_with_their_ancestors():
    cands = [Candidate(10, -1, 1, -0.1), Candidate(20, -1, 1, -2.0), Candidate(30, 0, 2, -0.5),
             Candidate(40, 0, 2, -3.0), Candidate(50, 2, 3, -0.6), Candidate(60, 1, 2, -2.1),
             Candidate(70, 3, 3, -1.0)]  # 70's parent 40 scores -3.0: 70 is not kept while 40 is not
    tree, picked = select_tree(cands, 4)
    assert picked == [0, 1, 2, 4] and tree == DraftTree((10, 20, 30, 50), (-1, -1, 0, 2))
    tree, picked = select_tree(cands, 6)
    assert picked == [0, 1, 2, 5, 3, 4] and tree == DraftTree((10, 20, 30, 60, 40, 50), (-1, -1, 0, 1, 0, 2))
    assert select_tree(cands, 1)[0] == DraftTree((10,), (-1,))


def logits_for(targets: list[int]) -> torch.Tensor:
    out = torch.zeros(len(targets), V)
    out[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return out


@pytest.mark.parametrize("targets, emitted, path", [
    ([10, 30, 0, 50, 0, 0, 0], [10, 30, 50, 0], [0, 2, 4]),   # deepest path, then the leaf's bonus row
    ([20, 0, 60, 0, 0, 0, 9], [20, 60, 9], [1, 5]),           # the second child, then its bonus
    ([10, 40, 0, 0, 0, 0, 0], [10, 40, 0], [0, 3]),           # sibling 3 (row 4): bonus from row 4
    ([33, 30, 0, 0, 0, 0, 0], [33], []),                      # no root child matches: the correction
    ([10, 44, 0, 0, 0, 0, 0], [10, 44], [0]),                 # node 0 accepted, no child of it matches
])
def test_greedy_walk(targets, emitted, path):
    params = SamplingParams(temperature=0.0)
    got = verify_tree(Sampler(), logits_for(targets), TREE, params, None, [1], [], set())
    assert got.token_ids == emitted and got.path == path and got.num_accepted == len(path)
    slow = verify_tree(Sampler(), logits_for(targets), TREE, SamplingParams(temperature=0.0, logprobs=1),
                       None, [1], [], set())  # the per-node sampler path
    assert slow.token_ids == emitted and slow.path == path and all(lp is not None for lp in slow.logprobs)


def test_rows_must_match_the_tree():
    with pytest.raises(ValueError, match="7 logits rows"):
        verify_tree(Sampler(), torch.zeros(3, V), TREE, SamplingParams(temperature=0.0), None, [1], [], set())
