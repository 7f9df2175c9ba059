"""Draft trees: the bookkeeping of tree speculation (no torch).

A draft tree hangs below the request's last known token (the *root*, at
position ``P = num_tokens - 1``). Node ``i`` holds a draft token and the index
of its parent (``-1``: the root); its depth is its parent's depth + 1 (root
children have depth 1), so node ``i`` stands for position ``P + depth_i``.

Flattening order: nodes are kept breadth first (by depth, then by the order
they were selected), so every parent precedes its children. The engine
verifies the flattened nodes as the drafts of one step (``spec_token_ids``):
query row 0 is the root, row ``1 + i`` is node ``i``, written to the KV slot of
position ``P + 1 + i``; a prefix of the flattened list is again a tree (the
scheduler may trim drafts to its token budget).

Attention mask: row ``r`` of a request's query block sees its whole context
before the block and, within the block, exactly the rows of its ancestors and
itself (``ancestor_bits``: bit ``j`` of row ``r``'s mask is set iff row ``j``
is visible); RoPE positions are ``P + depth`` (``positions``).

Selection (``select_tree``): candidate nodes carry a cumulative draft
log-probability (the sum along their path); the tree keeps the ``budget``
best by that score, ties to the shallower then earlier candidate. A child's
score is never above its parent's, so the kept set contains every kept
node's ancestors (a candidate whose parent was not kept is skipped anyway).

Acceptance: the verifier walks from the root and returns the accepted path
(node indices, one per depth). ``compaction`` lists the KV moves that put
the accepted nodes' entries at consecutive positions: the node at depth
``d`` moves from query row ``1 + i`` to row ``d``; done in path order no move
overwrites a source still to be read (a path's flat indices increase and
``i + 1 >= d``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

#: a query block of a tree request holds at most this many rows (the mask is one int64 per row)
MAX_TREE_ROWS = 63


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens in flattened (breadth-first) order with their parents' indices (-1: the root)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        if len(self.tokens) + 1 > MAX_TREE_ROWS:
            raise ValueError(f"a draft tree holds at most {MAX_TREE_ROWS - 1} nodes, got {len(self.tokens)}")
        depths: list[int] = []
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i}: parent {p} must be -1 or an earlier node")
            depths.append(1 if p < 0 else depths[p] + 1)
        object.__setattr__(self, "depths", tuple(depths))

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def prefix(self, n: int) -> DraftTree:
        """The first ``n`` nodes (a tree again: parents precede children)."""
        return self if n >= len(self) else DraftTree(self.tokens[:n], self.parents[:n])

    def children(self, node: int) -> list[int]:
        """``node``'s children (``-1``: the root's) in flattened order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        out: list[int] = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def ancestor_bits(self) -> list[int]:
        """Per query row (root, then the nodes): bit ``j`` set iff row ``j`` is the row itself or an ancestor."""
        bits = [1]
        for i, p in enumerate(self.parents):
            bits.append(bits[p + 1] | (1 << (i + 1)))
        return bits

    def positions(self, root_position: int) -> list[int]:
        """RoPE positions of the query rows: the root's, then ``root_position + depth`` per node."""
        return [root_position] + [root_position + d for d in self.depths]

    def compaction(self, path: Sequence[int]) -> list[tuple[int, int]]:
        """(source row, destination row) KV moves, in order, that make ``path``'s rows consecutive."""
        return [(1 + node, d) for d, node in enumerate(path, start=1) if 1 + node != d]


@dataclass(frozen=True)
class Candidate:
    """One expanded draft: its token, parent candidate (-1: the root), depth and cumulative log-probability."""

    token: int
    parent: int
    depth: int
    score: float


def select_tree(candidates: Sequence[Candidate], budget: int) -> tuple[DraftTree, list[int]]:
    """The ``budget`` best candidates as a ``DraftTree``, and each node's candidate index."""
    order = sorted(range(len(candidates)), key=lambda c: (-candidates[c].score, candidates[c].depth, c))
    rank = {c: r for r, c in enumerate(order)}
    kept: set[int] = set()
    for c in order:
        if len(kept) == budget:
            break
        parent = candidates[c].parent
        if parent < 0 or parent in kept:
            kept.add(c)
    flat = sorted(kept, key=lambda c: (candidates[c].depth, rank[c]))
    index = {c: i for i, c in enumerate(flat)}
    tree = DraftTree(tuple(candidates[c].token for c in flat),
                     tuple(index[candidates[c].parent] if candidates[c].parent >= 0 else -1 for c in flat))
    return tree, flat
