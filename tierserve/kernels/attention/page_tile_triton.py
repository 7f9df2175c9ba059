"""Triton helpers shared by the paged-attention kernels: read a tile of K or V tokens through a block table.

Token ``t`` of a sequence lives in page ``table[t // block_size]`` at slot
``t % block_size``; a tile of ``N`` consecutive tokens may span several pages
and is gathered token by token (each token's ``D`` channels are contiguous).
Plain pages load ``[N, D]`` values directly; int4 pages (``pages.py``) load
``[N, D/2]`` bytes, split them into low/high nibbles and interleave them
(``tl.join`` + reshape: channel ``2j`` low, ``2j+1`` high), load ``[N, D/g]``
fp16 scales and zeros, and dequantize ``zero + code * scale`` per group in
fp32 (each byte and each scale read once). The tile comes back in
``out_dtype`` (the query's dtype), so ``tl.dot`` sees matching operands.
Masked tokens read 0.

``UPCAST`` (``dot_operand``): triton 3.9's interpreter computes ``tl.dot``
of bfloat16 operands wrongly (numpy has no bfloat16; a 16x16 product came
out ~1e10 off), so on CPU tensors bf16 operands are rounded to bf16 and then
widened to fp32: the same values, an fp32 product with fp32 accumulation,
as the tensor cores compute on CUDA (where ``UPCAST`` is False).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_page_tile(codes_ptr, scale_ptr, zero_ptr, table_row_ptr, tok, tok_mask, head, offs_d, d_mask,
                   s_blk, s_tok, s_head, z_blk, z_tok, z_head, out_dtype: tl.constexpr, N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT_GROUP: tl.constexpr):
    blk = tl.load(table_row_ptr + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    slot = (tok % BLOCK_SIZE).to(tl.int64)
    row = blk * s_blk + slot * s_tok + head * s_head
    if QUANT_GROUP == 0:
        x = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=tok_mask[:, None] & d_mask[None, :],
                    other=0.0)
    else:  # int4 needs a power-of-two D (== BLOCK_D): whole bytes, whole groups, no channel mask
        offs_b = tl.arange(0, BLOCK_D // 2)
        byte = tl.load(codes_ptr + row[:, None] + offs_b[None, :], mask=tok_mask[:, None], other=0)
        code = tl.reshape(tl.join((byte & 0xF).to(tl.float32), (byte >> 4).to(tl.float32)), (N, BLOCK_D))
        offs_g = tl.arange(0, BLOCK_D // QUANT_GROUP)
        zoff = (blk * z_blk + slot * z_tok + head * z_head)[:, None] + offs_g[None, :]
        scale = tl.load(scale_ptr + zoff, mask=tok_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + zoff, mask=tok_mask[:, None], other=0.0).to(tl.float32)
        code = tl.reshape(code, (N, BLOCK_D // QUANT_GROUP, QUANT_GROUP))
        x = tl.reshape(zero[:, :, None] + code * scale[:, :, None], (N, BLOCK_D))
    return x.to(out_dtype)


@triton.jit
def dot_operand(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` rounded to ``dtype``; widened back to fp32 when ``UPCAST`` (see the module docstring)."""
    x = x.to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def soft_cap(s, cap):
    """``cap * tanh(s / cap)`` with tanh written as ``1 - 2 / (exp(2x) + 1)`` (exact limits at +-inf)."""
    e = tl.exp(2.0 * (s / cap))
    return cap * (1.0 - 2.0 / (e + 1.0))
