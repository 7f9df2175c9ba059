"""Speculative decoding options: the ``speculative`` part of EngineConfig (tierserve/engine/spec_decode/).

Validation in ``__post_init__`` raises InvalidParameterError naming the field
(ranges: ``num_speculative_tokens`` 1..16, ``draft_tree_width`` 1..8,
``draft_tree_nodes`` 1..62, ``prompt_lookup_min`` >= 1 and <= ``prompt_lookup_max``).
Re-exported by tierserve.config. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.config_fields import check_choice, option
from tierserve.errors import InvalidParameterError

#: SpeculativeConfig.method: "none" and the names in tierserve.engine.spec_decode.registry.PROPOSERS
#: (a layer above this one; tests/test_spec_engine.py checks the two agree)
SPECULATIVE_METHODS = ("none", "ngram", "gumiho")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (tierserve/engine/spec_decode/); off while ``method`` is "none".

    ``method`` "ngram": prompt lookup over the request's own tokens, longest
    n-gram first with n in [``prompt_lookup_min``, ``prompt_lookup_max``].
    ``method`` "gumiho": trained draft heads read from ``model`` (a folder
    written by ``tierserve train-draft``; spec_decode/gumiho.py).
    ``num_speculative_tokens``: drafts verified per request and step (1..16).
    ``draft_backoff``: pause proposing for a request whose verifications
    accept nothing (spec_decode/gate.py), for steps where verification is
    not free (off by default: at batch 1 on CPU it costs nothing to verify).
    ``draft_tree_width`` (1..8, default 1: a chain): gumiho drafts a tree,
    expanding the ``draft_tree_width`` best nodes of each depth into their
    ``draft_tree_width`` most likely children; ``num_speculative_tokens`` is
    its depth limit and ``draft_tree_nodes`` (1..62, default 6) its node
    budget (spec_decode/gumiho_tree.py; benchmarks/speculative.py measures
    width 2 with 6 nodes on par with the chain on one CPU thread, wider or
    larger trees slower there). ngram always drafts a chain.
    """

    method: str = option("none", "speculative decoding: none, ngram (prompt lookup) or gumiho (draft heads)",
                         name="speculative", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = option(4, "speculative decoding: draft tokens verified per step (1..16)")
    prompt_lookup_max: int = option(4, "ngram: longest n-gram matched")
    prompt_lookup_min: int = option(1, "ngram: shortest n-gram matched")
    draft_backoff: bool = option(False, "speculative decoding: a request whose drafts keep failing stops "
                                 "proposing for a while (tierserve/engine/spec_decode/gate.py)")
    model: str | None = option(None, "gumiho: the draft heads folder (tierserve train-draft --out)",
                               name="speculative_model")
    draft_tree_width: int = option(1, "gumiho: children per expanded node and nodes expanded per depth of the "
                                      "draft tree (1..8; 1 drafts a chain)")
    draft_tree_nodes: int = option(6, "gumiho: node budget of the draft tree (1..62; draft_tree_width > 1)")

    def __post_init__(self) -> None:
        check_choice("speculative", self.method, SPECULATIVE_METHODS)
        if (self.method == "gumiho") != (self.model is not None):
            raise InvalidParameterError("speculative_model", "is required by speculative='gumiho' and only by it "
                                        f"(speculative={self.method!r}, speculative_model={self.model!r})")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise InvalidParameterError("num_speculative_tokens",
                                        f"must be in 1..16, got {self.num_speculative_tokens}")
        if not 1 <= self.draft_tree_width <= 8:
            raise InvalidParameterError("draft_tree_width", f"must be in 1..8, got {self.draft_tree_width}")
        if not 1 <= self.draft_tree_nodes <= 62:
            raise InvalidParameterError("draft_tree_nodes", f"must be in 1..62, got {self.draft_tree_nodes}")
        if self.prompt_lookup_min < 1:
            raise InvalidParameterError("prompt_lookup_min", f"must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise InvalidParameterError("prompt_lookup_max", f"must be >= prompt_lookup_min = "
                                        f"{self.prompt_lookup_min}, got {self.prompt_lookup_max}")
