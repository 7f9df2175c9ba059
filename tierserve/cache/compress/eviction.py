"""Block eviction policy shared by PagedEviction, Expected Attention and StreamingLLM.

A sequence keeps ``num_kept`` tokens in its block table; its budget is
``C = config.budget`` or, with a ratio r, ``C = max(ceil((1 - r) * prompt
tokens), 2 * block_size)``. Never evictable: block 0 (it holds the attention
sinks, the first ``block_size`` >= 4 tokens) and the last block (the current
one, being written). Every other block is full.

When to evict (``num_to_evict``):

- a prompt step (a prefill chunk, or a step still inside the prompt, e.g.
  the one token left after a prefix-cache hit) or any multi-token step:
  while ``num_kept > C``, i.e.
  ``ceil((num_kept - C) / block_size)`` blocks, capped by the evictable count;
  afterwards ``num_kept <= C`` unless nothing else is evictable;
- a decode step, ``trigger = "block_full"`` (PagedEviction, StreamingLLM):
  one block when the newest block has just filled (``num_kept % block_size
  == 0``) and ``num_kept > C``;
- a decode step, ``trigger = "interval"`` (Expected Attention): every
  ``interval`` decode steps since the last compression, down to ``<= C``.

Invariant: with ``interval <= block_size`` the kept tokens never exceed
``C + block_size`` (the tests check it at every step). Which blocks go is the
subclass's ``rank_blocks`` (lowest first); with ``C`` >= the whole context
nothing is ever evicted, so output equals the uncompressed engine.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from tierserve.cache.compress.base import KVCompressor, SeqKV, layer_pages


class BlockEvictionCompressor(KVCompressor):
    evicts = True
    trigger = "block_full"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self._steps_since: dict[str, int] = {}

    @property
    def interval(self) -> int:
        return self.config.interval or self.spec.block_size

    def budget(self, num_prompt_tokens: int) -> int:
        if self.config.budget is not None:
            return self.config.budget
        return max(math.ceil((1.0 - self.config.ratio) * num_prompt_tokens), 2 * self.spec.block_size)

    def num_to_evict(self, seq: SeqKV) -> int:
        bs = self.spec.block_size
        budget = self.budget(seq.num_prompt_tokens)
        evictable = max(len(seq.block_ids) - 2, 0)
        over = seq.num_kept - budget
        if seq.num_step_tokens > 1 or seq.position <= seq.num_prompt_tokens:
            return min(evictable, -(-over // bs)) if over > 0 else 0
        if self.trigger == "block_full":
            return 1 if over > 0 and seq.num_kept % bs == 0 and evictable else 0
        steps = self._steps_since.get(seq.request_id, 0) + 1
        self._steps_since[seq.request_id] = steps
        if steps < self.interval or over <= 0:
            return 0
        self._steps_since[seq.request_id] = 0
        return min(evictable, -(-over // bs))

    def blocks_to_evict(self, seq: SeqKV) -> list[int]:
        n = self.num_to_evict(seq)
        if n <= 0:
            return []
        candidates = list(range(1, len(seq.block_ids) - 1))
        order = self.rank_blocks(seq, candidates)
        return sorted(order[:n])

    @abstractmethod
    def rank_blocks(self, seq: SeqKV, candidates: list[int]) -> list[int]:
        """``candidates`` (indices into the block table) ordered from first to evict to last."""

    def release(self, request_id: str) -> None:
        self._steps_since.pop(request_id, None)

    # -- helpers for scorers ---------------------------------------------------------------
    def gather_layer(self, layer: int, seq: SeqKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept keys and values of one layer, ``[num_kept, kv_heads, head_dim]`` fp32 each (packed pages
        dequantized: the scores see what attention sees)."""
        k, v = layer_pages(self.kv_caches[layer], seq.block_ids)
        return k[: seq.num_kept], v[: seq.num_kept]

    def rank_by_block_score(self, token_scores: torch.Tensor, candidates: list[int]) -> list[int]:
        """Candidates by ascending mean token score of their (full) block; ties by age (older first)."""
        bs = self.spec.block_size
        block_means = [float(token_scores[i * bs:(i + 1) * bs].mean()) for i in candidates]
        return [c for _, c in sorted(zip(block_means, candidates))]
