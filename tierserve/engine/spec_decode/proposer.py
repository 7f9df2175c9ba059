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
* A proposer that drafts from the target's hidden states sets
  ``needs_hidden``: the engine then calls ``observe(request_id, first_pos,
  hidden, next_tokens)`` after every forward with the final hidden states of
  the positions ``first_pos ..`` whose KV was kept and the token that follows
  each, and ``forget(request_id)`` when the request leaves; ``propose`` gets
  the ``request_id`` (the gumiho proposer keeps a window of states per request).
* ``propose_tree(token_ids, depth, width, budget)``: a ``DraftTree``
  (tree.py) for ``draft_tree_width`` > 1; by default the chain of ``propose``.
* ``draft_probs`` is None for a proposer whose drafts are point masses
  (deterministic drafts such as prompt lookup): the verifier then accepts a
  draft ``x`` with probability ``p(x)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from tierserve.engine.spec_decode.tree import DraftTree


class Proposer(ABC):
    """Drafts tokens for verification (see the module docstring for the contract)."""

    #: a registry name, for stats and errors
    name: str = ""

    #: whether the engine must hand it the target's hidden states (``observe``)
    needs_hidden: bool = False

    @classmethod
    def from_config(cls, config, model=None) -> Proposer:
        """Built from a ``SpeculativeConfig`` (tierserve/config.py) and the target model; a proposer reads the
        fields it needs."""
        return cls()

    @abstractmethod
    def propose(self, token_ids: Sequence[int], num_tokens: int, request_id: str | None = None) -> list[int]:
        """At most ``num_tokens`` draft tokens to follow ``token_ids`` (empty: no proposal)."""

    def propose_tree(self, token_ids: Sequence[int], depth: int, width: int, budget: int,
                     request_id: str | None = None) -> DraftTree:
        """A draft tree (tree.py) of at most ``budget`` nodes and ``depth`` levels; a proposer without trees
        drafts the chain of ``propose``."""
        return DraftTree.chain(self.propose(token_ids, min(depth, budget), request_id)[:min(depth, budget)])

    def observe(self, request_id: str, first_pos: int, hidden, next_tokens: list[int]) -> None:
        """The target's final hidden states [n, H] of positions ``first_pos ..`` (``needs_hidden`` only)."""

    def forget(self, request_id: str) -> None:
        """``request_id`` left the engine: drop what is kept for it."""
