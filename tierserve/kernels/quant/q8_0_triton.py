"""Fused Q8_0 dequantize-matmul in triton: ``y = x W^T + b`` over the Q8_0 weight split into planes.

Layout read (``ggml_planes.split_planes``, once at load): ``codes [N, K]``
(int8 as uint8, weight k of row n at column k) and ``scales [N, K / 32]``
(fp16 d per block of 32). ``q8_0_linear_triton`` takes the ggml blocks
(34 bytes: d, then 32 codes) and splits them per call.

Tiling as ``q4_0_triton``: one program per (BLOCK_M rows, BLOCK_N features,
K slab); per BLOCK_K step a ``[BLOCK_N, BLOCK_K]`` tile of codes is loaded
once, ``w = q d`` formed in fp32 registers and accumulated
(``packed_launch.accumulate``). The torch reference is ``Q8_0Format.linear``'s
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

TYPE_SIZE = 34


@triton.jit
def q8_0_linear_kernel(x_ptr, q_ptr, d_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K, USE_DOT: tl.constexpr,
                       DOT_KIND: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    kk = tl.arange(0, BLOCK_K)
    row = offs_n.to(tl.int64)[:, None]
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k = k0 + kk
        blk = k // 32
        wmask = (offs_n[:, None] < N) & (k[None, :] < K)
        d = tl.load(d_ptr + row * (K // 32) + blk[None, :], mask=wmask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + row * K + k[None, :], mask=wmask, other=0)
        w = q.to(tl.int8, bitcast=True).to(tl.float32) * d
        x = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok & (k[None, :] < K), other=0.0)
        acc = accumulate(acc, x, w, USE_DOT, DOT_KIND)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS, SPLIT_K)


def q8_0_linear_triton(x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q8_0 ``blocks [N, K / 32 * 34]`` (uint8)."""
    return q8_0_linear_planes(x, split_planes(blocks, TYPE_SIZE, 1), out_features, bias, config=config)


def q8_0_linear_planes(x: torch.Tensor, planes: GGMLPlanes, out_features: int,
                       bias: torch.Tensor | None = None, *, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` in x's dtype, W given as Q8_0 planes (``ggml_planes``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y = launch(q8_0_linear_kernel, (x2, planes.codes, planes.scales), x2, out_features, bias, x.dtype, config)
    return y.reshape(*lead, out_features)
