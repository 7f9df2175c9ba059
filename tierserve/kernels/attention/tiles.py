"""Tile choices of the paged-attention triton kernels (plain ints; tested with exact values).

Decode (``paged_decode_triton``), one program per (sequence, KV head, split):

- ``block_g = max(16, next_pow2(Hq / Hkv))``: the query heads of one KV head
  are the rows of one ``tl.dot`` (16 is the smallest M of an MMA), so K/V of
  a page are read once per KV head, not once per query head.
- ``tile_n = 64`` tokens per iteration for ``D <= 128``, 32 above (an
  iteration holds a ``[tile_n, D]`` K and V tile; 64 x 128 bf16 = 16 KiB each),
  never below ``next_pow2(block_size)``; a tile spans several pages, gathered
  token by token through the block table.
- splits per sequence (flash-decoding): enough programs to fill the GPU twice
  over, ``S = ceil(2 * num_sms / (B * Hkv))``, but each split keeps at least
  ``MIN_SPLIT_TOKENS = 128`` tokens of the longest (window-clipped) context
  and ``S <= MAX_SPLITS = 64``. Examples on an H200 (132 SMs), Hkv 8, 4k
  context: B=1 -> 33 splits, B=8 -> 5, B=32 -> 2 (wait: 264/256 -> 2), B=128
  -> 1. The reduce kernel (one program per (sequence, query head)) merges the
  ``S`` partial results by their log-sum-exp.
- ``num_warps = 4``, ``num_stages = 2``: a decode program is a stream of
  page loads; more warps per program only add idle lanes at ``block_g`` 16.

Prefill (``paged_prefill_triton``), one program per (sequence, KV head, row tile):

- rows are (query token, query head of the KV head) pairs, ``row = token *
  group + head``: GQA heads share the K/V tiles. ``block_m = 64`` rows and
  ``block_n = 64`` keys for ``D <= 128``; 32 and 32 above (D 256 keeps the
  fp32 accumulator ``[block_m, D]`` within the register file); ``block_n``
  never below ``next_pow2(block_size)``.
- ``num_warps = 4`` (8 for ``D > 128``), ``num_stages = 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64
PROGRAMS_PER_SM = 2


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DecodeTiles:
    block_g: int
    block_d: int
    tile_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PrefillTiles:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int = 2


def decode_splits(batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Number of flash-decoding splits per sequence (see the module docstring)."""
    wanted = cdiv(PROGRAMS_PER_SM * num_sms, max(1, batch * kv_heads))
    by_length = max(1, max_context // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def decode_tiles(group: int, head_dim: int, block_size: int, batch: int, kv_heads: int, max_context: int,
                 num_sms: int, num_splits: int | None = None) -> DecodeTiles:
    tile_n = max(64 if head_dim <= 128 else 32, next_pow2(block_size))
    splits = num_splits if num_splits is not None else decode_splits(batch, kv_heads, max_context, num_sms)
    return DecodeTiles(max(16, next_pow2(group)), next_pow2(head_dim), tile_n, splits)


def prefill_tiles(head_dim: int, block_size: int) -> PrefillTiles:
    small = head_dim <= 128
    block_n = max(64 if small else 32, next_pow2(block_size))
    return PrefillTiles(64 if small else 32, block_n, next_pow2(head_dim), 4 if small else 8)
