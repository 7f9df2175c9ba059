"""Paged decode attention in triton, flash-decoding style (torch reference: ``paged_attention.paged_decode``).

One query token per sequence (``q [B, Hq, D]``). Grid ``(B, Hkv, S)``: the
program for (sequence ``b``, KV head ``h``, split ``s``) holds the ``G = Hq /
Hkv`` query heads of ``h`` as the rows of a ``[block_g, D]`` tile and walks
its share of the visible keys ``[lo, L)`` (``L = seq_lens[b]``, ``lo = max(0,
L - window)`` with a sliding window, else 0), read in place through the
block table (``page_tile_triton.load_page_tile``), ``tile_n`` tokens at a
time, with the online softmax (Milakov & Gimelshein 2018; FlashAttention):

    s = scale * q K^T  (then cap * tanh(s / cap) if soft-capped), in log2 units
    m' = max(m, rowmax(s)),  a = 2^(m - m'),  p = 2^(s - m')
    l' = a l + rowsum(p),    acc' = a acc + p V

The visible range, aligned down to a page start, is cut into ``S`` equal
chunks (rounded up to ``tile_n``); a split whose chunk is empty stores
``lse = -inf``. Each split stores ``acc / l`` and ``lse = m + log2 l``
(fp32, ``[B, Hq, S, D]`` and ``[B, Hq, S]``); the reduce kernel (grid ``(B,
Hq)``) combines them: ``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s -
M)``, ``M = max_s lse_s`` (Dao et al., Flash-Decoding, 2023).

Dots run in the query dtype with fp32 accumulation (``input_precision
"ieee"`` for fp32, so no TF32 rounding); ``p`` is cast to the query dtype
before ``p V`` as in FlashAttention. int4 pages (``pages.py``) are
dequantized in the tile loader; the caller passes ``q H`` for rotated keys.
Tile sizes and the split count: ``tiles.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.attention.page_tile_triton import dot_operand, load_page_tile, soft_cap
from tierserve.kernels.attention.pages import dot_precision, page_view, upcast_dots
from tierserve.kernels.attention.tiles import decode_tiles

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(q_ptr, kc, ks, kz, vc, vs, vz, table_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr,
                         s_qb, s_qh, s_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head,
                         scale, softcap, window, num_splits,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         QUANT_GROUP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first = (lo // BLOCK_SIZE) * BLOCK_SIZE
    chunk = tl.cdiv(tl.cdiv(seq_len - first, num_splits), TILE_N) * TILE_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = h * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    qd = dot_operand(q, q.dtype, UPCAST)
    table_row = table_ptr + b.to(tl.int64) * s_tb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, TILE_N):
        tok = t0 + tl.arange(0, TILE_N)
        tok_mask = (tok >= lo) & (tok < end)
        k = load_page_tile(kc, ks, kz, table_row, tok, tok_mask, h, offs_d, d_mask, s_blk, s_tok, s_head,
                           z_blk, z_tok, z_head, q.dtype, TILE_N, BLOCK_D, BLOCK_SIZE, QUANT_GROUP)
        s = tl.dot(qd, tl.trans(dot_operand(k, q.dtype, UPCAST)), input_precision=DOT_PRECISION) * scale
        if HAS_SOFTCAP:
            s = soft_cap(s, softcap)
        s = tl.where(tok_mask[None, :], s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v = load_page_tile(vc, vs, vz, table_row, tok, tok_mask, h, offs_d, d_mask, s_blk, s_tok, s_head,
                           z_blk, z_tok, z_head, q.dtype, TILE_N, BLOCK_D, BLOCK_SIZE, QUANT_GROUP)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(p, q.dtype, UPCAST), dot_operand(v, q.dtype, UPCAST),
                                          input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * GROUP * tl.num_programs(1) + heads).to(tl.int64) * num_splits + split
    tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(mid_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, s_ob, s_oh, num_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (b * tl.num_programs(1) + hq).to(tl.int64) * num_splits
    lse = tl.load(mid_lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(mid_o_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + hq * s_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode(q: torch.Tensor, kv, meta, scale: float, sliding_window: int | None = None,
                 logit_softcap: float | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Triton twin of ``paged_attention.paged_decode``: ``q [B, Hq, D]`` -> ``[B, Hq, D]``.

    ``num_splits`` overrides the rule of ``tiles.decode_splits`` (tests use it
    to exercise several splits on short contexts).
    """
    pages = page_view(kv)
    batch, hq, dim = q.shape
    hkv = pages.k.shape[2]
    group = hq // hkv
    window = sliding_window if sliding_window is not None else 0
    longest = max(meta.seq_lens)
    if sliding_window is not None:
        longest = min(longest, sliding_window + meta.block_size)
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    t = decode_tiles(group, dim, meta.block_size, batch, hkv, longest, num_sms, num_splits)
    qk = pages.prepare_query(q)
    mid_o = torch.empty((batch, hq, t.num_splits, dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, hq, t.num_splits), dtype=torch.float32, device=q.device)
    table = meta.block_tables
    _decode_split_kernel[(batch, hkv, t.num_splits)](
        qk, pages.k, pages.k_scale, pages.k_zero, pages.v, pages.v_scale, pages.v_zero, table,
        meta.device_ints("seq_lens", q.device), mid_o, mid_lse,
        qk.stride(0), qk.stride(1), table.stride(0), *pages.strides(),
        float(scale), float(logit_softcap or 1.0), int(window), t.num_splits,
        GROUP=group, HEAD_DIM=dim, BLOCK_G=t.block_g, BLOCK_D=t.block_d, TILE_N=t.tile_n,
        BLOCK_SIZE=meta.block_size, QUANT_GROUP=pages.quant_group, HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=logit_softcap is not None, DOT_PRECISION=dot_precision(q), UPCAST=upcast_dots(q),
        num_warps=t.num_warps, num_stages=t.num_stages)
    out = torch.empty_like(q)
    _decode_reduce_kernel[(batch, hq)](mid_o, mid_lse, out, out.stride(0), out.stride(1), t.num_splits,
                                       HEAD_DIM=dim, BLOCK_D=t.block_d,
                                       BLOCK_S=max(2, triton.next_power_of_2(t.num_splits)), num_warps=1)
    return out
