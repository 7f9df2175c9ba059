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

Sliding-window layers (``keep_recent(W)``, set by the engine from the
model's largest window): attention masks a window by slot (kernels/
paged_attention.py: key slot j visible to query slot i iff j > i - W), and
eviction shifts slots against positions, so a block may go only when none
of its tokens is among the last ``W - 1`` kept ones (slot ``(i + 1) *
block_size <= num_kept - W + 1``). By induction the last ``W - 1`` positions
then always sit in the last ``W - 1`` slots, every evicted token lies
before the window of every future query, and each sliding layer sees
exactly the keys it sees without eviction (the slot window equals the
position window); full layers see the kept tokens. The window thus acts
as a floor under the budget: while ``C`` is smaller than the window plus
block 0 and the partial blocks at the window's edge, the kept tokens stay
above ``C`` (at most ``W - 1 + 2 * block_size`` after an eviction).

Invariant (no sliding window): with ``interval <= block_size`` the kept
tokens never exceed ``C + block_size`` (the tests check it at every step). Which blocks go is the
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
        self.recent_window = 0  # keep_recent: the model's largest sliding window (0: none)

    def keep_recent(self, window: int) -> None:
        """Never evict a token among the last ``window - 1`` kept ones (sliding-window layers; docstring)."""
        self.recent_window = max(int(window), 0)

    def candidates(self, seq: SeqKV) -> list[int]:
        """Evictable block indices, oldest first: not block 0, not the last, none inside the recent window."""
        end = len(seq.block_ids) - 1
        if self.recent_window:
            end = min(end, (seq.num_kept - self.recent_window + 1) // self.spec.block_size)
        return list(range(1, end))

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
        evictable = len(self.candidates(seq))
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
        order = self.rank_blocks(seq, self.candidates(seq))
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
