"""Prompt-lookup (n-gram) proposer: drafts by copying what followed the same n-gram earlier.

Algorithm (vLLM's ``ngram`` / prompt lookup, llama.cpp's lookup decoding):
for ``n`` from ``max_n`` down to ``min_n``, take the last ``n`` tokens of the
request (prompt + outputs) and look for an earlier occurrence of them; the
first ``n`` with an occurrence wins (longest match first), and among the
occurrences of that n-gram the most recent one (the latest start) wins, as
in vLLM v1. The proposal is the (up to) ``num_tokens`` tokens that followed
the occurrence; an occurrence may overlap the suffix itself, but at least
one token follows it, so a match always proposes something. No occurrence
for any ``n`` >= ``min_n``: no proposal (the engine then decodes plainly).
Defaults ``max_n = 4``, ``min_n = 1`` as vLLM's ``prompt_lookup_max/min``.

Implementation: one pass lists the earlier positions ``j`` holding the last
token; for each, latest first, the match length is extended backwards up to
``max_n``; the first position reaching ``max_n`` stops the search. Work is
O(L + candidates * max_n) for L tokens, in plain Python over ints.

Tests (tests/test_spec_ngram.py): exact proposals on constructed sequences,
and agreement with the literal "n from max down, latest occurrence" search on
random small-alphabet sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.engine.spec_decode.proposer import Proposer
from tierserve.errors import InvalidParameterError


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if min_n < 1:
            raise InvalidParameterError("prompt_lookup_min", f"must be >= 1, got {min_n}")
        if max_n < min_n:
            raise InvalidParameterError("prompt_lookup_max", f"must be >= prompt_lookup_min = {min_n}, got {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    @classmethod
    def from_config(cls, config, model=None) -> NgramProposer:
        return cls(config.prompt_lookup_min, config.prompt_lookup_max)

    def propose(self, token_ids: Sequence[int], num_tokens: int, request_id: str | None = None) -> list[int]:
        ids = token_ids
        length = len(ids)
        if num_tokens < 1 or length < 2:
            return []
        last = ids[-1]
        best_len, best_end = 0, -1
        candidates = [j for j in range(length - 1) if ids[j] == last]
        for j in reversed(candidates):  # latest first; a longer match replaces it
            m = 1
            while m < self.max_n and j - m >= 0 and ids[j - m] == ids[length - 1 - m]:
                m += 1
            if m > best_len:
                best_len, best_end = m, j
                if m == self.max_n:
                    break
        if best_len < self.min_n:
            return []
        return list(ids[best_end + 1: best_end + 1 + num_tokens])
