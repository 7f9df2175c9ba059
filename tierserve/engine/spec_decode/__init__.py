"""Speculative decoding: proposers draft tokens, the engine verifies them in one forward pass.

* ``proposer``: the ``Proposer`` contract; ``registry``: name -> proposer class.
* ``ngram``: prompt lookup over the request's own tokens (no model).
* ``rejection``: the speculative-sampling acceptance rule (function level).
* ``verifier``: one request's verified logits rows -> the tokens it emits.
* ``gate``: per-request draft back-off where drafts keep failing.
* ``decoder``: what the engine holds: proposals per request, verification, counters.
* ``tree``: draft trees (no torch): parents, depths, ancestor masks, selection, compaction moves;
  ``gumiho_tree``: the gumiho heads' trees; ``tree_verifier``: the tree walk (greedy and the
  multi-draft sampling rule of ``rejection``); ``tree_step``: the tree-masked forward and the
  accepted path's KV compaction.
"""
