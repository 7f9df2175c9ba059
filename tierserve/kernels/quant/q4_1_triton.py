"""Fused Q4_1 dequantize-matmul in triton: ``y = x W^T + b`` reading ggml Q4_1 blocks directly.

Layout read: row n of ``blocks [N, K / 32 * 20]`` holds, per ggml block b
(weights 32 b .. 32 b + 31), the fp16 scale d and fp16 minimum m (int16
elements 10 b and 10 b + 1 of the same storage) and 16 code bytes; byte j holds
element j in its low nibble and element j + 16 in its high nibble.

Tiling as ``q4_0_triton``: one program per (BLOCK_M rows, BLOCK_N features,
K slab); per BLOCK_K step each code byte is loaded once (a ``[BLOCK_N,
BLOCK_K / 2]`` tile), the halves ``w = d q + m`` are formed in fp32 registers
and accumulated against activation columns ``32 b + j`` and ``32 b + j + 16``
(``packed_launch.accumulate``). The torch reference is ``Q4_1Format.linear``'s
CPU path (dequantize, then F.linear); tests compare the two
(tests/test_quant_ggml.py, tests/test_gpu_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.ggml_planes import GGMLPlanes, split_planes
from tierserve.kernels.quant.packed_launch import accumulate, launch, store_tile
from tierserve.kernels.quant.tile_configs import TileConfig

TYPE_SIZE = 20


@triton.jit
def q4_1_linear_kernel(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K, USE_DOT: tl.constexpr,
                       DOT_KIND: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    c = tl.arange(0, BLOCK_K // 2)
    row = offs_n.to(tl.int64)[:, None]
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        blk = k0 // 32 + c // 16
        k_lo = blk * 32 + c % 16
        wmask = (offs_n[:, None] < N) & (k_lo[None, :] < K)
        meta = row * (K // 32) + blk[None, :]
        d = tl.load(d_ptr + meta, mask=wmask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + meta, mask=wmask, other=0.0).to(tl.float32)
        byte = tl.load(q_ptr + row * (K // 2) + k0 // 2 + c[None, :], mask=wmask, other=0)
        byte = byte.to(tl.int32)
        w_lo = (byte & 0xF).to(tl.float32) * d + mn
        w_hi = (byte >> 4).to(tl.float32) * d + mn
        xmask = m_ok & (k_lo[None, :] < K)
        x_lo = tl.load(x_ptr + offs_m[:, None] * K + k_lo[None, :], mask=xmask, other=0.0)
        x_hi = tl.load(x_ptr + offs_m[:, None] * K + k_lo[None, :] + 16, mask=xmask, other=0.0)
        acc = accumulate(acc, x_lo, w_lo, USE_DOT, DOT_KIND)
        acc = accumulate(acc, x_hi, w_hi, USE_DOT, DOT_KIND)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS, SPLIT_K)


def q4_1_linear_triton(x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q4_1 ``blocks [N, K / 32 * 20]`` (uint8)."""
    return q4_1_linear_planes(x, split_planes(blocks, TYPE_SIZE, 2), out_features, bias, config=config)


def q4_1_linear_planes(x: torch.Tensor, planes: GGMLPlanes, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q4_1 planes (``ggml_planes``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y = launch(q4_1_linear_kernel, (x2, planes.codes, planes.scales, planes.mins), x2, out_features, bias,
               x.dtype, config)
    return y.reshape(*lead, out_features)
