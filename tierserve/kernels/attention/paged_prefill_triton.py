"""Varlen paged attention in triton for any step (torch reference: ``paged_attention.paged_prefill``).

Covers chunked prefill, prefix-cache hits and mixed prefill + decode batches:
sequence ``b`` has ``n = query_start[b+1] - query_start[b]`` queries at
positions ``[L - n, L)`` (``L = seq_lens[b]``) and attends causally over its
pages, which already hold the chunk's own K/V (written by ``slot_mapping``
before attention, as in the reference). Grid ``(B, Hkv, ceil(max_n * G /
block_m))``; rows of a program are (query token, query head) pairs of KV
head ``h``, ``row = token * G + g`` (``G = Hq / Hkv``), so GQA heads share
each K/V tile. A program reads keys ``[lo, hi)`` with ``hi`` one past its
last row's position and ``lo = max(0, first_position - window + 1)`` under
a sliding window (else 0), ``block_n`` tokens at a time through the block
table, with the online softmax of ``paged_decode_triton.py`` and the mask

    key j visible to the row at position p  iff  j <= p  and  (no window or j > p - window)

Tree masks (``meta.tree_bits``, speculative draft trees): row ``r`` of the
query block also needs bit ``j`` of its int64 mask for a key ``ctx + j`` inside
the block (``ctx = L - n``); keys before the block stay visible; -1 rows are
causal (the shift is clamped to 63, a bit that -1 has set).

Rows past the sequence's queries are masked (their fully masked softmax is
kept finite and never stored). int4 pages are dequantized in the tile
loader (the caller passes ``q H`` for the rotated keys). Tiles: ``tiles.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention.page_tile_triton import dot_operand, load_page_tile, soft_cap
from tierserve.kernels.attention.pages import dot_precision, page_view, upcast_dots
from tierserve.kernels.attention.tiles import cdiv, prefill_tiles


@triton.jit
def _prefill_kernel(q_ptr, kc, ks, kz, vc, vs, vz, table_ptr, query_start_ptr, seq_lens_ptr, bits_ptr, out_ptr,
                    s_qt, s_qh, s_ot, s_oh, s_tb, s_blk, s_tok, s_head, z_blk, z_tok, z_head,
                    scale, softcap, window,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, QUANT_GROUP: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, TREE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q0 = tl.load(query_start_ptr + b)
    n_q = tl.load(query_start_ptr + b + 1) - q0
    seq_len = tl.load(seq_lens_ptr + b)
    if mt * BLOCK_M >= n_q * GROUP:
        return
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_i = rows // GROUP
    heads = h * GROUP + rows % GROUP
    row_mask = tok_i < n_q
    pos = seq_len - n_q + tok_i
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    io_mask = row_mask[:, None] & d_mask[None, :]
    tok_rows = (q0 + tok_i).to(tl.int64)
    q = tl.load(q_ptr + tok_rows[:, None] * s_qt + heads[:, None] * s_qh + offs_d[None, :], mask=io_mask,
                other=0.0)
    qd = dot_operand(q, q.dtype, UPCAST)
    table_row = table_ptr + b.to(tl.int64) * s_tb

    first_pos = seq_len - n_q + (mt * BLOCK_M) // GROUP
    hi = tl.minimum(seq_len, seq_len - n_q + (mt * BLOCK_M + BLOCK_M - 1) // GROUP + 1)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
    if TREE:
        bits = tl.load(bits_ptr + tok_rows, mask=row_mask, other=-1)
        ctx = seq_len - n_q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for t0 in range(lo, hi, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        tok_mask = tok < hi
        k = load_page_tile(kc, ks, kz, table_row, tok, tok_mask, h, offs_d, d_mask, s_blk, s_tok, s_head,
                           z_blk, z_tok, z_head, q.dtype, BLOCK_N, BLOCK_D, BLOCK_SIZE, QUANT_GROUP)
        s = tl.dot(qd, tl.trans(dot_operand(k, q.dtype, UPCAST)), input_precision=DOT_PRECISION) * scale
        if HAS_SOFTCAP:
            s = soft_cap(s, softcap)
        visible = tok_mask[None, :] & (tok[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (tok[None, :] > pos[:, None] - window)
        if TREE:
            shift = tl.minimum(tl.maximum(tok - ctx, 0), 63).to(tl.int64)
            in_tree = ((bits[:, None] >> shift[None, :]) & 1) != 0
            visible = visible & ((tok[None, :] < ctx) | in_tree)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v = load_page_tile(vc, vs, vz, table_row, tok, tok_mask, h, offs_d, d_mask, s_blk, s_tok, s_head,
                           z_blk, z_tok, z_head, q.dtype, BLOCK_N, BLOCK_D, BLOCK_SIZE, QUANT_GROUP)
        acc = acc * alpha[:, None] + tl.dot(dot_operand(p, q.dtype, UPCAST), dot_operand(v, q.dtype, UPCAST),
                                          input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok_rows[:, None] * s_ot + heads[:, None] * s_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill(q: torch.Tensor, kv, meta, scale: float, sliding_window: int | None = None,
                  logit_softcap: float | None = None) -> torch.Tensor:
    """Triton twin of ``paged_attention.paged_prefill``: ``q [T, Hq, D]`` -> ``[T, Hq, D]``."""
    pages = page_view(kv)
    _, hq, dim = q.shape
    hkv = pages.k.shape[2]
    group = hq // hkv
    t = prefill_tiles(dim, meta.block_size)
    starts = meta.query_start
    longest = max(hi - lo for lo, hi in zip(starts[:-1], starts[1:]))
    qk = pages.prepare_query(q)
    out = torch.empty_like(q)
    table = meta.block_tables
    grid = (meta.num_seqs, hkv, max(1, cdiv(longest * group, t.block_m)))
    tree = meta.tree_bits is not None
    if tree and sliding_window is not None:
        raise InvalidParameterError("sliding_window", "tree attention masks (draft trees) do not support "
                                                      f"sliding-window layers (window {sliding_window})")
    seq_lens = meta.device_ints("seq_lens", q.device)
    _prefill_kernel[grid](
        qk, pages.k, pages.k_scale, pages.k_zero, pages.v, pages.v_scale, pages.v_zero, table,
        meta.device_ints("query_start", q.device), seq_lens, meta.tree_bits_t(q.device) if tree else seq_lens, out,
        qk.stride(0), qk.stride(1), out.stride(0), out.stride(1), table.stride(0), *pages.strides(),
        float(scale), float(logit_softcap or 1.0), int(sliding_window or 0),
        GROUP=group, HEAD_DIM=dim, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d,
        BLOCK_SIZE=meta.block_size, QUANT_GROUP=pages.quant_group, HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=logit_softcap is not None, DOT_PRECISION=dot_precision(q), UPCAST=upcast_dots(q), TREE=tree,
        num_warps=t.num_warps, num_stages=t.num_stages)
    return out
