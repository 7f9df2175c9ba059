"""OffQ W4A4 matmul in triton: 4-bit token codes times 4-bit weight codes, integer dot per weight group.

The ``offq`` format (offq_format.py) with ``act_quant`` (W4A4): after the
input transform (``fmt.rotate_input``, torch) each token row is ``x'' ~ q_x s_t``
with integer codes ``q_x`` in [-8, 7] (int8 here) and one fp32 scale ``s_t``
(``quantize_tokens``); each weight group of ``g`` input columns is
``w_hat = (q_w - 8) s + z`` with codes ``q_w`` in [0, 15] (two per byte,
column 2j in the low nibble) and bf16 ``s``, ``z``. The reference
``y = (q_x s_t) W_hat^T + fold + b`` is, per output n, with ``G`` the groups:

    y[t, n] = s_t * sum_G ( s[n, G] * sum_{k in G} q_x[t, k] (q_w[n, k] - 8)  +  z[n, G] * sum_{k in G} q_x[t, k] )
              + (fold[n] + b[n])

The inner sums are integer (|sum| <= 8 * 8 * g, exact in int32); one
program owns ``BLOCK_M`` tokens and ``BLOCK_N`` outputs and walks K in
``BLOCK_K`` steps that never straddle a group (``BLOCK_K`` divides ``g``):
per step it loads the weight bytes once as a ``[BLOCK_N, BLOCK_K / 2]`` tile,
splits the nibbles, loads the even and odd activation columns, forms both
integer dots (``tl.dot`` on int8 with int32 accumulation when ``USE_DOT``;
int32 multiply-adds otherwise, the M = 1 path and the interpreter's), and
adds ``s * dot + z * rowsum`` to an fp32 accumulator. The token scale
multiplies the finished row, then ``fold + b`` (summed once on the host,
fp32) is added and the result cast to x's dtype.

Differences from the reference (float32 ``F.linear`` on the dequantized
operands): only fp32 summation order and where ``s_t`` and the group
scales multiply (a few ulps of ``sum |q_x s_t w_hat|`` per output; the tests
bound it by ``1e-5`` of that). Shapes: ``K`` a multiple of 32 and ``g`` (the
effective group; ``K`` for per-channel weights) a multiple of 32;
``offq_triton_supported`` says whether a weight qualifies.

Tests: tests/test_offq_triton.py under ``TRITON_INTERPRET=1`` on CPU
tensors (small M, N, K, per channel and grouped, every rotation) against
``OffQFormat.linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.offq_format import OffQFormat, quantize_tokens

K_ALIGN = 32


@triton.jit
def offq_w4a4_kernel(xq_ptr, st_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, NG,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    row_m = offs_m.to(tl.int64)[:, None] * K
    row_n = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = tl.load(q_ptr + row_n * (K // 2) + k0 // 2 + c[None, :], mask=n_ok[:, None], other=0)
        byte = byte.to(tl.int32)
        w_lo = (byte & 0xF) - 8
        w_hi = (byte >> 4) - 8
        x_even = tl.load(xq_ptr + row_m + k0 + 2 * c[None, :], mask=m_ok[:, None], other=0)
        x_odd = tl.load(xq_ptr + row_m + k0 + 2 * c[None, :] + 1, mask=m_ok[:, None], other=0)
        if USE_DOT:
            dot = tl.dot(x_even, tl.trans(w_lo.to(tl.int8)), out_dtype=tl.int32)
            dot += tl.dot(x_odd, tl.trans(w_hi.to(tl.int8)), out_dtype=tl.int32)
        else:
            xe = x_even.to(tl.int32)
            xo = x_odd.to(tl.int32)
            dot = tl.sum(xe[:, None, :] * w_lo[None, :, :] + xo[:, None, :] * w_hi[None, :, :], axis=2)
        rowsum = tl.sum(x_even.to(tl.int32) + x_odd.to(tl.int32), axis=1)
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * NG + g, mask=n_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * NG + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += dot.to(tl.float32) * s[None, :] + rowsum.to(tl.float32)[:, None] * z[None, :]
    acc = acc * tl.load(st_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def offq_triton_supported(packed: PackedWeight) -> bool:
    """W4A4 ``offq`` weight whose K and group the kernel takes (module docstring)."""
    cols, group = packed.shape[1], int(packed.meta["group"])
    return bool(packed.meta.get("act_quant")) and cols % K_ALIGN == 0 and group % K_ALIGN == 0


def block_k(group: int) -> int:
    """The widest K step (64 or 32) that divides the group."""
    return 64 if group % 64 == 0 else K_ALIGN


def offq_w4a4_matmul(xq: torch.Tensor, token_scale: torch.Tensor, packed: PackedWeight,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, use_dot: bool | None = None) -> torch.Tensor:
    """``y [M, N] = token_scale * (xq W_hat^T) + bias`` with int8 codes ``xq [M, K]`` and the packed weight;
    ``use_dot`` (default: M >= 16 on CUDA) picks the int8 ``tl.dot`` over int32 multiply-adds."""
    if not offq_triton_supported(packed):
        raise InvalidParameterError("offq", f"the triton W4A4 kernel needs act_quant and in-features and group "
                                            f"multiples of {K_ALIGN}; got shape {list(packed.shape)}, "
                                            f"group {packed.meta['group']}, act_quant {packed.meta.get('act_quant')}")
    m, k = xq.shape
    n, group = packed.shape[0], int(packed.meta["group"])
    t = packed.tensors
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    use_dot = (m >= 16 and xq.device.type == "cuda") if use_dot is None else use_dot
    bm, bn = (16 if m >= 16 else 1 << max(0, (m - 1).bit_length())), 32
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    offq_w4a4_kernel[grid](xq.contiguous(), token_scale.reshape(-1).float().contiguous(), t["qweight"].contiguous(),
                           t["scale"].contiguous(), t["zero"].contiguous(),
                           bias if bias is not None else y, y, m, n, k, k // group, GROUP=group,
                           HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k(group),
                           USE_DOT=use_dot)
    return y


def offq_linear_triton(fmt: OffQFormat, x: torch.Tensor, packed: PackedWeight,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``OffQFormat.linear`` with the W4A4 product in the kernel: rotation and token codes in torch."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, scale = quantize_tokens(fmt.rotate_input(x.reshape(-1, k), packed))
    extra = packed.tensors.get("fold")
    if bias is not None:
        extra = bias.float() if extra is None else extra + bias.float()
    y = offq_w4a4_matmul(q.to(torch.int8), scale, packed, None if extra is None else extra.float().contiguous(),
                         x.dtype)
    return y.reshape(*lead, packed.shape[0])


def offq_cuda_module(q):
    """The CUDA module of an ``offq`` QuantizedLinear ``q`` (kernels/gpu_linear.py), or None when the kernel
    does not take its weight (W4A16, or K / group not multiples of 32: the torch reference stays)."""
    from tierserve.kernels.gpu_linear import TritonLinear

    class OffQTritonLinear(TritonLinear):
        """``offq`` W4A4 on the device: rotation and token codes in torch, the integer product in the kernel."""

        def __init__(self, q, packed: PackedWeight):
            super().__init__(q)
            self._keys = tuple(packed.tensors)
            for key, tensor in packed.tensors.items():
                self.register_buffer(key, tensor.contiguous())

        def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
            packed = PackedWeight(self.fmt.name, (self.out_features, self.in_features),
                                  {k: getattr(self, k) for k in self._keys}, self.meta)
            return offq_linear_triton(self.fmt, x2, packed, self.bias)

    packed = q.packed()
    return OffQTritonLinear(q, packed) if offq_triton_supported(packed) else None
