"""Fused Q4_0 dequantize-matmul in triton: ``y = x W^T + b`` over the Q4_0 weight split into planes.

Layout read (``ggml_planes.split_planes``, done once at load): row n of
``codes [N, K / 2]`` holds, per ggml block b (weights 32 b .. 32 b + 31), its
16 code bytes at 16 b .. 16 b + 15, byte j holding element j in its low nibble
and element j + 16 in its high nibble; ``scales [N, K / 32]`` (fp16) its scale d.
``q4_0_linear_triton`` takes the ggml blocks themselves and splits them per
call (tests, one-off calls); the engine's ``GGMLTritonLinear`` keeps the planes.

One program owns BLOCK_M rows of x, BLOCK_N output features and a contiguous
K slab of ``k_per_split`` columns (``tile_configs`` picks the sizes per M and
shape). Per BLOCK_K step it loads each code byte of its rows once, as a
contiguous ``[BLOCK_N, BLOCK_K / 2]`` tile (byte c: block c // 16, j = c % 16), forms
the two nibble halves ``w_lo = (q_lo - 8) d`` and ``w_hi = (q_hi - 8) d`` in
fp32 registers, gathers the matching activation columns ``32 b + j`` and
``32 b + j + 16``, and accumulates both halves (``packed_launch.accumulate``:
fp32 multiply-adds at M = 1, ``tl.dot`` otherwise). The torch reference is
``Q4_0Format.linear``'s CPU path (dequantize, then F.linear); tests compare
them (tests/test_quant_ggml.py, tests/test_gpu_linear.py) over M in
{1, 3, 7, 16, 33, 64} and N, K multiples of 32 that are not powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.ggml_planes import GGMLPlanes, split_planes
from tierserve.kernels.quant.packed_launch import accumulate, launch, store_tile
from tierserve.kernels.quant.tile_configs import TileConfig

TYPE_SIZE = 18


@triton.jit
def q4_0_linear_kernel(x_ptr, q_ptr, d_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
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
        d = tl.load(d_ptr + row * (K // 32) + blk[None, :], mask=wmask, other=0.0).to(tl.float32)
        byte = tl.load(q_ptr + row * (K // 2) + k0 // 2 + c[None, :], mask=wmask, other=0)
        byte = byte.to(tl.int32)
        w_lo = ((byte & 0xF) - 8).to(tl.float32) * d
        w_hi = ((byte >> 4) - 8).to(tl.float32) * d
        xmask = m_ok & (k_lo[None, :] < K)
        x_lo = tl.load(x_ptr + offs_m[:, None] * K + k_lo[None, :], mask=xmask, other=0.0)
        x_hi = tl.load(x_ptr + offs_m[:, None] * K + k_lo[None, :] + 16, mask=xmask, other=0.0)
        acc = accumulate(acc, x_lo, w_lo, USE_DOT, DOT_KIND)
        acc = accumulate(acc, x_hi, w_hi, USE_DOT, DOT_KIND)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS, SPLIT_K)


def q4_0_linear_triton(x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q4_0 ``blocks [N, K / 32 * 18]`` (uint8)."""
    return q4_0_linear_planes(x, split_planes(blocks, TYPE_SIZE, 1), out_features, bias, config=config)


def q4_0_linear_planes(x: torch.Tensor, planes: GGMLPlanes, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q4_0 planes (``ggml_planes``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y = launch(q4_0_linear_kernel, (x2, planes.codes, planes.scales), x2, out_features, bias, x.dtype, config)
    return y.reshape(*lead, out_features)
