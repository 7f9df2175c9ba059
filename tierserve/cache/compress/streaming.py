"""StreamingLLM baseline (Xiao et al. 2023, arXiv 2309.17453): attention sinks + a recent window.

Keeps the first tokens (the sinks) and the most recent ones; evicts the
oldest middle block. At block granularity the sinks are block 0 (the first
``block_size`` tokens, >= the paper's 4) and the window is the last blocks up
to the budget. Policy (``eviction.BlockEvictionCompressor``, trigger
``block_full``): when the newest block fills over budget, drop block 1 (the
oldest non-sink block); a prompt over budget drops its oldest middle blocks.
Keys keep the RoPE of their original positions (no re-rotation into the
cache's positions as in the paper's "rolling" variant): the engine's
attention is position-exact over the kept tokens.
"""

from __future__ import annotations

from tierserve.cache.compress.base import SeqKV, register
from tierserve.cache.compress.eviction import BlockEvictionCompressor


@register
class StreamingCompressor(BlockEvictionCompressor):
    name = "streaming"
    trigger = "block_full"

    def rank_blocks(self, seq: SeqKV, candidates: list[int]) -> list[int]:
        return sorted(candidates)  # oldest first
