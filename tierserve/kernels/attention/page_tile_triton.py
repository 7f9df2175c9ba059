"""Triton helpers shared by the paged-attention kernels: read a tile of K or V tokens through a block table.

Token ``t`` of a sequence lives in page ``table[t // block_size]`` at slot
``t % block_size``; a tile of ``N`` consecutive tokens may span several pages
and is gathered token by token (each token's ``D`` channels are contiguous).
Plain pages load ``[N, D]`` values directly; int4 pages (``pages.py``) load
the byte holding each channel's nibble and its group's fp16 scale and zero,
and dequantize ``zero + code * scale`` in fp32. The tile comes back in
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
                   s_blk, s_tok, s_head, z_blk, z_tok, z_head, out_dtype: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, QUANT_GROUP: tl.constexpr):
    blk = tl.load(table_row_ptr + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    slot = (tok % BLOCK_SIZE).to(tl.int64)
    mask = tok_mask[:, None] & d_mask[None, :]
    row = blk * s_blk + slot * s_tok + head * s_head
    if QUANT_GROUP == 0:
        x = tl.load(codes_ptr + row[:, None] + offs_d[None, :], mask=mask, other=0.0)
    else:
        byte = tl.load(codes_ptr + row[:, None] + (offs_d // 2)[None, :], mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs_d % 2) * 4)[None, :]) & 0xF
        zrow = blk * z_blk + slot * z_tok + head * z_head
        zoff = zrow[:, None] + (offs_d // QUANT_GROUP)[None, :]
        scale = tl.load(scale_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + zoff, mask=mask, other=0.0).to(tl.float32)
        x = zero + code.to(tl.float32) * scale
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
