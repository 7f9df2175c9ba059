"""Triton kernel: packed FP4 (MXFP4/NVFP4) weight matmul, W4A16 and W4A4.

``y[M, N] = a[M, K] W[N, K]^T + b`` where W is stored as E2M1 codes two per
byte (``qs [N, K/2]``, low nibble = even column) and one scale byte per group
of ``GROUP`` columns (``scales [N, K/GROUP]``). The kernel decodes on the fly:
code -> value arithmetically (``_e2m1``: sign s, exponent e, mantissa m give
m / 2 for e = 0, else (2 + m) 2^e / 4, i.e. 0, .5, 1, 1.5, 2, 3, 4, 6; no
table gather per code), scale byte -> effective fp32 scale through a 256-entry
table (E8M0 powers of two for MXFP4; E4M3 values divided by the global scale
for NVFP4; one load per group), so one kernel serves both formats.

Activations: W4A16 reads ``x [M, K]`` in its dtype; W4A4 (``ACT_FP4``) reads
packed activation codes ``[M, K/2]`` and fp32 per-(row, group) scales
produced by ``FP4Format.quantize_activations`` and decodes them the same way.

Tiling (``tile_configs`` picks the sizes per M and shape): one program per
(BLOCK_M rows, BLOCK_N features, contiguous K slab). Per BLOCK_K step each
weight byte is loaded once as a ``[BLOCK_N, BLOCK_K / 2]`` tile; its low and
high nibbles are the even and odd columns, decoded and scaled in fp32
registers and accumulated against the even and odd activation columns
(``packed_launch.accumulate``: fp32 multiply-adds at M = 1, ``tl.dot``
otherwise, in the activations' dtype when they are bf16/fp16). The torch
reference is ``fp4.fp4_linear_reference``; tests compare them
(tests/test_fp4.py, tests/test_gpu_linear.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.fp4 import ActQuant
from tierserve.kernels.quant.packed_launch import accumulate, dot_kind, launch, store_tile
from tierserve.kernels.quant.tile_configs import TileConfig


@triton.jit
def _e2m1(code):
    """E2M1 code (int32 in 0..15) -> its fp32 value (module docstring)."""
    e = (code >> 1) & 3
    m = code & 1
    mag = tl.where(e == 0, m * 2, (2 + m) << e).to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _decode_half(q_ptr, s_ptr, lut_ptr, rows, c, k0, mask, K, GROUP: tl.constexpr,
                 SCALE_IS_BYTE: tl.constexpr):
    """Even and odd columns (k0 + 2c, k0 + 2c + 1) of ``rows``, decoded to fp32."""
    r64 = rows.to(tl.int64)[:, None]
    byte = tl.load(q_ptr + r64 * (K // 2) + (k0 // 2 + c)[None, :], mask=mask, other=0).to(tl.int32)
    s_off = r64 * (K // GROUP) + ((k0 + 2 * c) // GROUP)[None, :]
    if SCALE_IS_BYTE:
        scale = tl.load(lut_ptr + tl.load(s_ptr + s_off, mask=mask, other=0).to(tl.int32))
    else:
        scale = tl.load(s_ptr + s_off, mask=mask, other=0.0)
    lo = _e2m1(byte & 0xF) * scale
    hi = _e2m1(byte >> 4) * scale
    return tl.where(mask, lo, 0.0), tl.where(mask, hi, 0.0)


@triton.jit
def fp4_linear_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, lut_ptr, b_ptr, y_ptr, M, N, K, k_per_split,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPLIT_K, USE_DOT: tl.constexpr,
                      DOT_KIND: tl.constexpr, GROUP: tl.constexpr, ACT_FP4: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(2) * k_per_split
    c = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k_ok = (k0 + 2 * c) < K
        w_lo, w_hi = _decode_half(w_ptr, ws_ptr, lut_ptr, offs_n, c, k0,
                                  (offs_n < N)[:, None] & k_ok[None, :], K, GROUP, True)
        amask = (offs_m < M)[:, None] & k_ok[None, :]
        if ACT_FP4:
            a_lo, a_hi = _decode_half(x_ptr, xs_ptr, lut_ptr, offs_m, c, k0, amask, K, GROUP, False)
        else:
            a = x_ptr + offs_m.to(tl.int64)[:, None] * K + (k0 + 2 * c)[None, :]
            a_lo = tl.load(a, mask=amask, other=0.0)
            a_hi = tl.load(a + 1, mask=amask, other=0.0)
        acc = accumulate(acc, a_lo, w_lo, USE_DOT, DOT_KIND)
        acc = accumulate(acc, a_hi, w_hi, USE_DOT, DOT_KIND)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, M, N, HAS_BIAS, SPLIT_K)


def fp4_linear_triton(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, scale_table: torch.Tensor,
                      group: int, bias: torch.Tensor | None = None, act: ActQuant | None = None, *,
                      out_dtype: torch.dtype = torch.float32, config: TileConfig | None = None) -> torch.Tensor:
    """Same contract as ``fp4.fp4_linear_reference`` (``y`` in ``out_dtype``, float32 by default).

    W4A4 dots run in x's dtype like W4A16 ones (the decoded activations are
    rounded to it when it is bf16/fp16).
    """
    m, k = x.shape
    lut = scale_table.float().contiguous()
    if act is None:
        a_ptr, as_ptr = x.contiguous(), lut  # as_ptr unused without ACT_FP4
    else:
        a_ptr, as_ptr = act.qs.contiguous(), act.scale.float().contiguous()
    args = (a_ptr, as_ptr, qs.contiguous(), scales.contiguous(), lut)
    return launch(fp4_linear_kernel, args, x, qs.shape[0], bias, out_dtype, config,
                  kind=dot_kind(x.dtype, x.device), GROUP=group, ACT_FP4=act is not None)
