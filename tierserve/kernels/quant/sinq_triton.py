"""Triton kernel for SINQ: ``y = x W_hat^T + b`` with ``W_hat = (Q - z) * s_row * s_col`` read packed.

Layout read: ``q_packed [N, K * BITS / 8]`` (``8 / BITS`` codes per byte,
lowest bits first), ``s_row`` and ``z`` fp16 ``[N, K / GROUP]`` (one per row
and SINQ tile), ``s_col`` fp16 ``[K]``.

One program owns BLOCK_M rows of x, BLOCK_N output features and a contiguous
K slab (``tile_configs`` picks the sizes per M and shape). Per BLOCK_K step it
scales the activation tile by the column scales (``x s_col`` in fp32, rounded
to x's dtype only for a tensor-core dot), unpacks the codes of a ``[BLOCK_N,
BLOCK_K]`` weight tile, forms ``(Q - z[n, t]) s_row[n, t]`` in fp32 and
accumulates (``packed_launch.accumulate``). Same name and semantics as the
torch reference ``tierserve.kernels.quant.sinq.sinq_linear`` (float32
output by default); tests compare the two over a grid of shapes, bit widths
and M (tests/test_sinq.py, tests/test_gpu_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.packed_launch import accumulate, launch, store_tile
from tierserve.kernels.quant.tile_configs import TileConfig


@triton.jit
def _sinq_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, c_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K, USE_DOT: tl.constexpr,
                        DOT_KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    kk = tl.arange(0, BLOCK_K)
    per: tl.constexpr = 8 // BITS
    n64 = offs_n.to(tl.int64)[:, None]
    n_tiles = K // GROUP
    m_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok & k_ok[None, :], other=0.0)
        xs = x.to(tl.float32) * tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        wmask = (offs_n[:, None] < N) & k_ok[None, :]
        byte = tl.load(q_ptr + n64 * (K // per) + (k // per)[None, :], mask=wmask, other=0).to(tl.int32)
        q = ((byte >> ((k % per) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        t_off = n64 * n_tiles + (k // GROUP)[None, :]
        z = tl.load(z_ptr + t_off, mask=wmask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + t_off, mask=wmask, other=0.0).to(tl.float32)
        acc = accumulate(acc, xs, (q - z) * s, USE_DOT, DOT_KIND)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS, SPLIT_K)


def sinq_linear(x: torch.Tensor, q_packed: torch.Tensor, s_row: torch.Tensor, z: torch.Tensor,
                s_col: torch.Tensor, bits: int, group: int, *, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float32, config: TileConfig | None = None) -> torch.Tensor:
    """``x [M, in] @ W_hat^T (+ b)`` -> ``[M, out]`` in ``out_dtype`` from SINQ's packed codes and scales."""
    x = x.contiguous()
    args = (x, q_packed.contiguous(), s_row.contiguous(), z.contiguous(), s_col.contiguous())
    return launch(_sinq_linear_kernel, args, x, q_packed.shape[0], bias, out_dtype, config, BITS=bits,
                  GROUP=group)
