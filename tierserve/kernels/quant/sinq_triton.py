"""Triton kernel for SINQ: ``y = x W_hat^T`` with ``W_hat = (Q - z) * s_row * s_col`` read packed.

Each program owns a BLOCK_M x BLOCK_N tile of y and walks the input dimension
one SINQ tile (GROUP columns) at a time: it scales the activation tile by the
column scales ``s_col``, unpacks the codes (``8/BITS`` per byte, lowest bits
first), forms ``(Q - z[n, t]) * s_row[n, t]`` in float32 and accumulates with
``tl.dot`` (IEEE fp32). Same name and semantics as the torch reference
``tierserve.kernels.quant.sinq.sinq_linear``; tests compare the two under
``TRITON_INTERPRET=1`` over a grid of shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sinq_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, c_ptr, y_ptr, M, N, K, n_tiles,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < M
    n_ok = cols < N
    per: tl.constexpr = 8 // BITS
    row_bytes = K // per
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, n_tiles):
        k = t * GROUP + tl.arange(0, GROUP)
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
        x = x * tl.load(c_ptr + k).to(tl.float32)[None, :]
        byte = tl.load(q_ptr + cols[:, None] * row_bytes + (k // per)[None, :], mask=n_ok[:, None], other=0)
        q = ((byte.to(tl.int32) >> ((k % per) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        z = tl.load(z_ptr + cols * n_tiles + t, mask=n_ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + cols * n_tiles + t, mask=n_ok, other=0.0).to(tl.float32)
        w = (q - z[:, None]) * s[:, None]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def sinq_linear(x: torch.Tensor, q_packed: torch.Tensor, s_row: torch.Tensor, z: torch.Tensor,
                s_col: torch.Tensor, bits: int, group: int, block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """``x [M, in] @ W_hat^T`` -> float32 [M, out] from SINQ's packed codes and scales."""
    x = x.contiguous()
    M, K = x.shape
    N = q_packed.shape[0]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _sinq_linear_kernel[grid](x, q_packed.contiguous(), s_row.contiguous(), z.contiguous(), s_col.contiguous(), y,
                              M, N, K, K // group, BITS=bits, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n)
    return y
