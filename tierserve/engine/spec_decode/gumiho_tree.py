"""Gumiho draft trees: top-k children per depth from the serial head and the MLP heads, pruned to a budget.

Inputs: the request's window of pairs (gumiho.py), the depth limit ``depth``,
the width ``w`` and the node budget ``budget``. Scores are cumulative draft
log-probabilities over the heads' draft vocabulary (log-softmax of the
heads' logits), summed along a node's path.

* Serial depths (1 .. ``serial_depth``): depth 1 is the ``w`` most likely
  tokens after the window. At each next depth the ``w`` best nodes of the
  previous depth (by score) are expanded: each appends its pair ``(z, token)``
  (``z`` the serial output that predicted it) to its own path's pairs, the
  serial head runs on all of them in one batch, and each gets its ``w`` most
  likely children.
* MLP depths (after ``serial_depth``): for each of the ``w`` best serial
  leaves, MLP head ``j`` reads ``(z, token)`` of the leaf and gives the
  distribution ``j + 1`` places after it, the same for every node of that
  depth below the leaf (the heads are parallel); so at each MLP depth the
  ``w`` best nodes below the leaf each get the head's ``w`` most likely tokens.
* Pruning (tree.select_tree): the ``budget`` best candidates by score, which
  always include their ancestors; flattened breadth first.

With ``w = 1`` every depth has one node and the tree is the chain
``GumihoProposer.propose`` drafts (tests/test_spec_tree.py checks this).
Cost: one serial forward per serial depth (a batch of ``w`` windows) and one
pass of the MLP heads over the ``w`` leaves, each with one logits product over
the draft vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.engine.spec_decode.tree import Candidate, DraftTree, select_tree


@dataclass
class _Node:
    """Expansion state of a candidate: the pairs up to its parent, and the serial output that predicted it."""

    pairs: torch.Tensor  # [L, 2H]
    z: torch.Tensor      # [H]


def _best(cands: list[Candidate], ids: list[int], width: int) -> list[int]:
    return sorted(ids, key=lambda c: (-cands[c].score, c))[:width]


def draft_tree(prop, pairs: torch.Tensor, depth: int, width: int, budget: int) -> DraftTree:
    """``prop``: a ``GumihoProposer``; ``pairs`` [L, 2H] its request's window (see the module docstring)."""
    heads, cfg = prop.heads, prop.cfg
    cands: list[Candidate] = []
    state: list[_Node] = []

    def add(parent: int, d: int, base: float, z: torch.Tensor, node_pairs: torch.Tensor, logp: torch.Tensor):
        lp, idx = logp.topk(min(width, logp.shape[-1]))
        for tok, score in zip(prop.vocab[idx].tolist(), lp.tolist()):
            cands.append(Candidate(tok, parent, d, base + score))
            state.append(_Node(node_pairs, z))

    z0 = heads.serial_forward(pairs[None])[0, -1]
    add(-1, 1, 0.0, z0, pairs, prop.log_probs(z0[None])[0])
    level = list(range(len(cands)))
    d = 1
    while d < min(depth, cfg.serial_depth):
        grow = _best(cands, level, width)
        seqs = [torch.cat([state[c].pairs, heads.pairs(state[c].z[None], prop._embed([cands[c].token]))])
                [-cfg.window:] for c in grow]
        z = heads.serial_forward(torch.stack(seqs))[:, -1]
        logp = prop.log_probs(z)
        first = len(cands)
        for row, c in enumerate(grow):
            add(c, d + 1, cands[c].score, z[row], seqs[row], logp[row])
        level, d = list(range(first, len(cands))), d + 1
    more = min(depth - d, cfg.num_mlp_heads)
    if more > 0:  # every leaf's MLP heads in one batch, their logits in one product
        leaves = _best(cands, level, width)
        z = torch.stack([state[leaf].z for leaf in leaves])
        feats = heads.mlp_forward(z, prop._embed([cands[leaf].token for leaf in leaves]))[:more]
        logps = prop.log_probs(torch.cat(feats)).view(more, len(leaves), -1)
        for b, leaf in enumerate(leaves):
            below = [leaf]
            for j in range(more):
                first = len(cands)
                for c in _best(cands, below, width):
                    add(c, d + 1 + j, cands[c].score, state[leaf].z, state[leaf].pairs, logps[j, b])
                below = list(range(first, len(cands)))
    tree, _ = select_tree(cands, budget)
    return tree
