"""The proposer contract: what drafts tokens for the engine to verify (no torch).

A ``Proposer`` is asked, after every step in which a request sampled and did
not finish, for up to ``num_tokens`` draft tokens that would follow the
request's tokens (prompt + outputs so far). The engine verifies them in the
next step's forward pass (tierserve/engine/spec_decode/verifier.py), so a
proposer never affects *what* is generated, only how many tokens one step
yields: greedy output stays token-identical and sampled output keeps the
target distribution whatever it proposes.

Contract:

* ``propose(token_ids, num_tokens)`` returns a list of at most
  ``num_tokens`` ints (token ids in the model's vocabulary), possibly empty;
  an empty list means "no proposal": the request then decodes one token per
  step exactly as without speculation (a proposer must stop proposing where
  it has nothing, so that speculation costs nothing there).
* ``num_tokens >= 1``; ``token_ids`` is never empty and is not modified.
* Deterministic given its inputs (and its own state); it must not read or
  change engine state.
* ``draft_probs`` is None for a proposer whose drafts are point masses
  (deterministic drafts such as prompt lookup): the verifier then accepts a
  draft ``x`` with probability ``p(x)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class Proposer(ABC):
    """Drafts tokens for verification (see the module docstring for the contract)."""

    #: a registry name, for stats and errors
    name: str = ""

    @classmethod
    def from_config(cls, config) -> Proposer:
        """Built from a ``SpeculativeConfig`` (tierserve/config.py); a proposer reads the fields it needs."""
        return cls()

    @abstractmethod
    def propose(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """At most ``num_tokens`` draft tokens to follow ``token_ids`` (empty: no proposal)."""
