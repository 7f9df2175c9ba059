"""Proposer registry: the ``speculative`` option's name -> proposer class, and the builder."""

from __future__ import annotations

from tierserve.engine.spec_decode.gumiho import GumihoProposer
from tierserve.engine.spec_decode.ngram import NgramProposer
from tierserve.engine.spec_decode.proposer import Proposer

#: the names tierserve.config.SPECULATIVE_METHODS lists besides "none" (tests check the two agree)
PROPOSERS: dict[str, type[Proposer]] = {"ngram": NgramProposer, "gumiho": GumihoProposer}


def build_proposer(config, model=None) -> Proposer | None:
    """The proposer of a ``SpeculativeConfig`` (tierserve/config.py) for the target ``model``, or None when
    ``method`` is "none"."""
    if config.method == "none":
        return None
    return PROPOSERS[config.method].from_config(config, model)
