"""Verification of one request's draft tree: logits rows of the tree's query rows -> the tokens it emits.

Rows (tree.py): row 0 is the model's prediction after the request's tokens
(the root), row ``1 + i`` after the path to node ``i``. The walk starts at the
root; at a node with children:

* the target distribution ``p`` is the sampler's (``Sampler.target_probs``)
  with the outputs extended by the tokens accepted so far, as in verifier.py;
* greedy: the child whose token is ``argmax p`` is accepted (the first such
  child in flattened order), else ``argmax p`` is emitted and the walk stops;
* sampling: the children are tried in flattened order by
  ``rejection.multi_draft_verify`` (accept with ``min(1, p/q)``, on rejection
  ``p <- norm(max(p - q, 0))``, all rejected: a draw from the residual); the
  drafts are deterministic (point masses: the draft head's top-k) unless
  ``draft_probs`` gives a node's draft distribution.

An accepted leaf ends the walk with the bonus token, sampled from its row by
the sampler itself. So ``a`` accepted nodes (one per depth, the *path*) emit
``a + 1`` tokens, exactly as a chain of those drafts would (a chain is the tree
whose nodes each have one child; its verification draws the same random
numbers as verifier.py's). Greedy requests without penalties, logprobs or
an active min_tokens mask take one batched argmax over the rows.

Tests: tests/test_spec_tree.py (greedy walks on constructed logits) and
tests/test_spec_tree_sampling.py (the emitted distribution equals the target's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.engine.logprobs import TokenLogprobs, compute_logprobs
from tierserve.engine.penalties import needs_penalties
from tierserve.engine.sampler import Sampler, SamplingBatch
from tierserve.engine.spec_decode.rejection import multi_draft_verify
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class TreeVerified:
    """What one request emits: the accepted path's tokens then one corrected or bonus token."""

    token_ids: list[int]
    path: list[int]  # accepted node indices, one per depth
    logprobs: list[TokenLogprobs | None]

    @property
    def num_accepted(self) -> int:
        return len(self.path)


def _greedy_walk(tree: DraftTree, targets: list[int]) -> TreeVerified:
    path: list[int] = []
    node = -1
    while True:
        target = targets[node + 1]
        child = next((c for c in tree.children(node) if tree.tokens[c] == target), None)
        if child is None:
            return TreeVerified([tree.tokens[i] for i in path] + [target], path, [None] * (len(path) + 1))
        path.append(child)
        node = child


def verify_tree(sampler: Sampler, logits: torch.Tensor, tree: DraftTree, params: SamplingParams,
                generator: torch.Generator | None, prompt_token_ids: list[int], output_token_ids: list[int],
                stop_ids: set[int], draft_probs: dict[int, torch.Tensor] | None = None) -> TreeVerified:
    """Verify ``tree`` against ``logits`` [1 + len(tree), V] (see the module docstring)."""
    if logits.shape[0] != len(tree) + 1:
        raise ValueError(f"a tree of {len(tree)} nodes needs {len(tree) + 1} logits rows, got {logits.shape[0]}")
    if (params.greedy and not needs_penalties(params) and params.logprobs is None
            and (params.min_tokens <= len(output_token_ids) or not stop_ids)):
        return _greedy_walk(tree, logits.argmax(dim=-1).tolist())
    emitted: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    path: list[int] = []
    node = -1
    while True:
        row = logits[node + 1:node + 2]
        batch = SamplingBatch([params], [generator], [prompt_token_ids], [output_token_ids + emitted], [stop_ids])
        children = tree.children(node)
        if not children:  # the bonus token
            out = sampler(row, batch)
            return TreeVerified(emitted + [out.token_ids[0]], path, logprobs + [out.logprobs[0]])
        p = sampler.target_probs(row, batch)[0]
        if params.greedy:
            token = int(p.argmax())
            taken = next((i for i, c in enumerate(children) if tree.tokens[c] == token), None)
        else:
            qs = [draft_probs.get(c) if draft_probs else None for c in children]
            token, taken = multi_draft_verify(p, [tree.tokens[c] for c in children], qs, generator)
        emitted.append(token)
        logprobs.append(compute_logprobs(row, [0], [token], [params.logprobs])[0]
                        if params.logprobs is not None else None)
        if taken is None:
            return TreeVerified(emitted, path, logprobs)
        node = children[taken]
        path.append(node)
