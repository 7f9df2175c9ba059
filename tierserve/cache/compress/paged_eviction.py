"""PagedEviction (arXiv 2509.04377): evict whole blocks by the value-to-key norm ratio.

Token score ``s_i = mean_h ||V_i,h|| / ||K_i,h||`` (averaged over KV heads,
``||K||`` clamped to >= 1e-6), then averaged over layers here because one
block table serves every layer (the paper's vLLM setting). A block's score is
the mean of its tokens' scores. Policy (``eviction.BlockEvictionCompressor``,
trigger ``block_full``): each time the newest block fills and the sequence is
over its budget, evict the one full block (never block 0 (sinks) nor the
newest) with the lowest score; only the block table changes.

Deviation: for a prompt longer than the budget the paper drops the lowest
*tokens*; here the lowest-scoring *blocks* go (same score, block
granularity), so every page stays whole and nothing is copied.
Tests (tests/test_kv_compress_eviction.py): cache <= budget + one block at
every step; with a budget above the context, tokens and logits equal the
uncompressed engine; the evicted block is the argmin of the score.
"""

from __future__ import annotations

import torch

from tierserve.cache.compress.base import SeqKV, register
from tierserve.cache.compress.eviction import BlockEvictionCompressor


def value_key_ratio(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[L, H, D]`` keys and values -> ``[L]`` token scores mean_h ||v|| / ||k||."""
    return (v.norm(dim=-1) / k.norm(dim=-1).clamp_min(1e-6)).mean(dim=-1)


@register
class PagedEvictionCompressor(BlockEvictionCompressor):
    name = "paged_eviction"
    trigger = "block_full"

    def token_scores(self, seq: SeqKV) -> torch.Tensor:
        total = None
        for layer in range(self.spec.num_layers):
            k, v = self.gather_layer(layer, seq)
            s = value_key_ratio(k, v)
            total = s if total is None else total + s
        return total / self.spec.num_layers

    def rank_blocks(self, seq: SeqKV, candidates: list[int]) -> list[int]:
        return self.rank_by_block_score(self.token_scores(seq), candidates)
