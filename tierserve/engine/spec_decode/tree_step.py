"""A step with draft trees: one forward with tree masks, and the accepted path's KV compaction after.

Forward (``run_tree_step``): the runner flattens the step as usual
(engine/model_runner.py: a request verifying drafts runs its last known token
and its drafts, written to the slots of the next consecutive positions, with
logits for all of them); for a request whose drafts are a tree (tree.py, the
flattened nodes, possibly trimmed by the scheduler to a prefix) ``tree_inputs``
sets the query rows' RoPE positions to ``root + depth`` and their attention
mask to the tree's ancestor bits (``StepInputs.tree_bits``, passed on as
``AttentionMetadata.tree_bits``; every other row is causal). The runner then
runs the step itself (``ModelRunner.run``: eager, since it has tree bits).

Compaction (``compact_kv``): after verification the node at depth ``d`` of
the accepted path must hold the KV of position ``root + d``; its entries move,
in every layer, from the slot of query row ``1 + i`` to the slot of row ``d``
(``DraftTree.compaction``; one gather then one scatter per tensor, so the
order of the moves does not matter). The engine's rollback then frees the
blocks past the accepted tokens as for a chain. Plain KV pages only (a
packed or evicting cache is refused when the tree option is set).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tierserve.engine.model_runner import RunnerOutput
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.engine.step_inputs import StepInputs


def run_tree_step(runner, sched, requests, trees: dict[str, DraftTree]) -> RunnerOutput:
    """The runner's forward of ``sched`` with ``trees[request_id]`` masks and positions."""
    return runner.run(tree_inputs(runner.flatten(sched, requests), sched, trees))


def tree_inputs(step: StepInputs, sched, trees: dict[str, DraftTree]) -> StepInputs:
    """``step`` (the runner's flattening of ``sched``) with the tree rows' depth positions and ancestor bits."""
    positions = list(step.positions)
    bits = [-1] * len(step.tokens)
    for i, sr in enumerate(sched.scheduled):
        tree = trees.get(sr.request_id)
        if tree is None or not sr.spec_token_ids:
            continue
        tree = tree.prefix(len(sr.spec_token_ids))
        lo, hi = step.query_start[i], step.query_start[i + 1]
        positions[lo:hi] = tree.positions(sr.start)
        bits[lo:hi] = tree.ancestor_bits()
    return replace(step, positions=positions, tree_bits=bits)


def slot(block_ids: list[int], block_size: int, position: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


def compact_kv(kv_caches, block_ids: list[int], block_size: int, root: int, moves: list[tuple[int, int]]) -> None:
    """Move each layer's K/V from the slot of position ``root + src`` to that of ``root + dst`` per move."""
    if not moves:
        return
    dev = kv_caches[0].k.device
    src = torch.tensor([slot(block_ids, block_size, root + s) for s, _ in moves], dtype=torch.long, device=dev)
    dst = torch.tensor([slot(block_ids, block_size, root + d) for _, d in moves], dtype=torch.long, device=dev)
    for kv in kv_caches:
        for t in (kv.k, kv.v):
            flat = t.view(-1, *t.shape[2:])
            flat.index_copy_(0, dst, flat.index_select(0, src))
