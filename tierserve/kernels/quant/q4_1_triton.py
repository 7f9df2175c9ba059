"""Fused Q4_1 dequantize-matmul in triton: ``y = x W^T + b`` reading ggml Q4_1 blocks directly.

Grid: one program per (BLOCK_M rows of x, BLOCK_N output features). The loop
walks in-features in steps of BLOCK_K (a multiple of 32, so a step covers whole
ggml blocks). For each weight element (n, k) of the tile the kernel reads, from
row n of the packed ``blocks [N, K / 32 * 20]``, block b = k // 32 at byte
offset 20 b: the fp16 scale d (bytes 0-1, little-endian), the fp16 minimum m
(bytes 2-3) and the code byte 4 + k % 16, whose low nibble holds element
k % 32 < 16 and high nibble the others. w = d * q + m is formed in fp32 registers and ``tl.dot`` accumulates
in fp32; the bias is added at the end. The torch reference is
``Q4_1Format.linear``'s CPU path (dequantize, then F.linear); tests compare the
two under ``TRITON_INTERPRET=1`` over M in {1, 7, 64} and N, K multiples of 32
(including non-powers of two), atol/rtol 1e-4 relative to the output scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TYPE_SIZE = 20


@triton.jit
def q4_1_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, row_bytes,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        wmask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        block = w_ptr + offs_n[:, None] * row_bytes + (offs_k[None, :] // 32) * 20
        d_lo = tl.load(block, mask=wmask, other=0).to(tl.uint16)
        d_hi = tl.load(block + 1, mask=wmask, other=0).to(tl.uint16)
        d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        m_lo = tl.load(block + 2, mask=wmask, other=0).to(tl.uint16)
        m_hi = tl.load(block + 3, mask=wmask, other=0).to(tl.uint16)
        mn = (m_lo | (m_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        byte = tl.load(block + 4 + (offs_k[None, :] % 16), mask=wmask, other=0).to(tl.int32)
        shift = ((offs_k[None, :] % 32) // 16) * 4
        q = (byte >> shift) & 0xF
        w = q.to(tl.float32) * d + mn
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def q4_1_linear_triton(x: torch.Tensor, blocks: torch.Tensor, out_features: int,
                       bias: torch.Tensor | None = None, *, block_m: int = 16, block_n: int = 32,
                       block_k: int = 64) -> torch.Tensor:
    """``x [..., K] @ W^T (+ b)`` with W given as Q4_1 ``blocks [N, K / 32 * 20]`` (uint8)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_features, block_n))
    q4_1_linear_kernel[grid](x2, blocks, bias if bias is not None else y, y, m, out_features, k,
                             blocks.shape[1], HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=block_k)
    return y.reshape(*lead, out_features)
