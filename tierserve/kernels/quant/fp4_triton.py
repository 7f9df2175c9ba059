"""Triton kernel: packed FP4 (MXFP4/NVFP4) weight matmul, W4A16 and W4A4.

``y[M, N] = a[M, K] W[N, K]^T + b`` where W is stored as E2M1 codes two per
byte (``qs [N, K/2]``, low nibble = even column) and one scale byte per group
of ``GROUP`` columns (``scales [N, K/GROUP]``). The kernel decodes on the fly:
code -> value through the 16-entry E2M1 table, scale byte -> effective fp32
scale through a 256-entry table (E8M0 powers of two for MXFP4; E4M3 values
divided by the global scale for NVFP4), so one kernel serves both formats.

Activations: W4A16 reads ``x [M, K]`` in its dtype and computes in fp32; W4A4
(``ACT_FP4``) reads packed activation codes ``[M, K/2]`` and fp32 per-(row,
group) scales produced by ``FP4Format.quantize_activations``.

Tiling: a program owns a BLOCK_M x BLOCK_N output tile and walks K in steps
of BLOCK_K (32, a multiple of both group sizes), accumulating
``tl.dot(a, w^T)`` in fp32 with IEEE precision (no TF32). Ragged M/N/K edges
are masked. The torch reference is ``fp4.fp4_linear_reference``; tests compare
them under ``TRITON_INTERPRET=1`` (atol 1e-4 + rtol 1e-4: only the summation
order differs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.fp4 import ActQuant, e2m1_table

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _decode_tile(q_ptr, s_ptr, lut_ptr, e2m1_ptr, rows, kk, mask, K, GROUP: tl.constexpr,
                 SCALE_IS_BYTE: tl.constexpr):
    byte = tl.load(q_ptr + rows[:, None] * (K // 2) + kk[None, :] // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((kk[None, :] % 2) * 4)) & 0xF
    val = tl.load(e2m1_ptr + code)
    s_off = rows[:, None] * (K // GROUP) + kk[None, :] // GROUP
    if SCALE_IS_BYTE:
        sbyte = tl.load(s_ptr + s_off, mask=mask, other=0).to(tl.int32)
        scale = tl.load(lut_ptr + sbyte)
    else:
        scale = tl.load(s_ptr + s_off, mask=mask, other=0.0)
    return tl.where(mask, val * scale, 0.0)


@triton.jit
def fp4_linear_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, lut_ptr, e2m1_ptr, b_ptr, y_ptr, M, N, K,
                      GROUP: tl.constexpr, ACT_FP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        kmask = kk < K
        w = _decode_tile(w_ptr, ws_ptr, lut_ptr, e2m1_ptr, rn, kk, (rn < N)[:, None] & kmask[None, :], K,
                         GROUP, True)
        amask = (rm < M)[:, None] & kmask[None, :]
        if ACT_FP4:
            a = _decode_tile(x_ptr, xs_ptr, lut_ptr, e2m1_ptr, rm, kk, amask, K, GROUP, False)
        else:
            a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=amask, other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def fp4_linear_triton(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, scale_table: torch.Tensor,
                      group: int, bias: torch.Tensor | None = None, act: ActQuant | None = None) -> torch.Tensor:
    """Same contract as ``fp4.fp4_linear_reference``; returns float32 [M, N]."""
    m, k = x.shape
    n = qs.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    e2m1 = e2m1_table(x.device)
    lut = scale_table.float().contiguous()
    if act is None:
        a_ptr, as_ptr = x.contiguous(), lut  # as_ptr unused without ACT_FP4
    else:
        a_ptr, as_ptr = act.qs.contiguous(), act.scale.float().contiguous()
    b = bias.float().contiguous() if bias is not None else y
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    fp4_linear_kernel[grid](a_ptr, as_ptr, qs.contiguous(), scales.contiguous(), lut, e2m1, b, y, m, n, k,
                            GROUP=group, ACT_FP4=act is not None, HAS_BIAS=bias is not None,
                            BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y
