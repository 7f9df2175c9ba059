"""Prompt-lookup proposer: exact proposals, and the literal longest-first search as the reference."""

from __future__ import annotations

import random

import pytest

from tierserve.config import SPECULATIVE_METHODS, SpeculativeConfig
from tierserve.engine.spec_decode.ngram import NgramProposer
from tierserve.engine.spec_decode.registry import PROPOSERS, build_proposer
from tierserve.errors import InvalidParameterError


def reference(ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """For n from max_n down to min_n: the latest earlier start i of the last n tokens; what followed it."""
    L = len(ids)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        suffix = ids[L - n:]
        for i in range(L - n - 1, -1, -1):
            if ids[i:i + n] == suffix:
                return ids[i + n:i + n + k]
    return []


def test_longest_match_wins_over_a_later_shorter_one():
    #        0  1  2  3  4  5  6  7  8  9
    ids = [1, 2, 3, 4, 9, 7, 3, 5, 1, 2, 3]
    # suffix [1,2,3] occurs at 0 (followed by 4, 9, 7); "3" alone occurs later at 6 (followed by 5)
    assert NgramProposer().propose(ids, 3) == [4, 9, 7]
    assert NgramProposer(min_n=1, max_n=1).propose(ids, 2) == [5, 1]  # n = 1 only: the latest "3"


def test_latest_occurrence_among_equal_lengths_and_k_limit():
    ids = [5, 6, 1, 5, 6, 2, 8, 5, 6]
    assert NgramProposer().propose(ids, 1) == [2]
    assert NgramProposer().propose(ids, 5) == [2, 8, 5, 6]  # runs to the end of the tokens


def test_no_match_proposes_nothing():
    assert NgramProposer().propose([1, 2, 3, 4], 4) == []
    assert NgramProposer().propose([7], 4) == []
    assert NgramProposer(min_n=2).propose([1, 2, 9, 2], 4) == []  # only a 1-gram matches
    assert NgramProposer().propose([1, 2, 1], 0) == []


def test_overlapping_run():
    assert NgramProposer().propose([4, 4, 4, 4, 4], 3) == [4]  # latest start of the 4-gram: index 0


@pytest.mark.parametrize("min_n,max_n", [(1, 4), (2, 3), (1, 1), (3, 6)])
def test_matches_the_literal_search(min_n, max_n):
    rng = random.Random(min_n * 10 + max_n)
    prop = NgramProposer(min_n, max_n)
    for _ in range(400):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k = rng.randrange(1, 6)
        assert prop.propose(ids, k) == reference(ids, k, min_n, max_n), (ids, k)


def test_registry_and_config():
    assert set(SPECULATIVE_METHODS) == {"none", *PROPOSERS}
    assert build_proposer(SpeculativeConfig()) is None
    p = build_proposer(SpeculativeConfig("ngram", 3, prompt_lookup_max=5, prompt_lookup_min=2))
    assert isinstance(p, NgramProposer) and (p.min_n, p.max_n) == (2, 5)
    for k in (0, 17):
        with pytest.raises(InvalidParameterError, match="num_speculative_tokens.*1..16"):
            SpeculativeConfig("ngram", k)
    with pytest.raises(InvalidParameterError, match="speculative"):
        SpeculativeConfig("medusa")
    with pytest.raises(InvalidParameterError, match="prompt_lookup_max"):
        SpeculativeConfig("ngram", prompt_lookup_max=1, prompt_lookup_min=2)
