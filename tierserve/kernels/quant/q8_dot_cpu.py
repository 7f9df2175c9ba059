"""GGUF Q4_1 / Q8_0 weights times Q8 activations by integer dot products on the CPU (q8_dot_cpu.cpp).

torch's int4 CPU kernel (int4_cpu.py) decodes every 4-bit weight to float and
multiplies it with a bf16-rounded activation: on a host without AVX512 that is
compute-bound at about half the memory bandwidth at batch 1. This path keeps the
GGUF blocks as they are in the file and does what llama.cpp's CPU backend does:

1. each activation row is quantized per block of 32: ``dx = max|x| / 127``,
   ``xq = sign(v) floor(|v| + 1/2)`` for ``v = x * (1 / dx)`` in float32 (half away
   from zero) in -127..127, ``sx = dx * sum(xq)``;
2. per weight block, the exact integer ``sum(q * xq)`` (AVX2: ``maddubs`` of the
   unsigned 4-bit codes with the signed 8-bit activations, then ``madd`` with ones;
   Q8_0's signed codes through the sign trick; for Q8_0 one ``vpdpbusd`` instead where
   the host has VNNI, the same integers), scaled once:
   Q4_1 ``d dx sum(q xq) + m sx``, Q8_0 ``d dx sum(q xq)`` (``d``, ``m`` the
   block's fp16 scale and min);
3. the blocks of a row summed in float32 (8 lanes under AVX2), rows split over
   the intra-op threads. Under AVX2 each block's ``(d, m)`` is converted with one
   instruction and multiplied by the activation block's ``(dx, sx)`` as one 2-lane
   product; tiles of 4 activation rows (2 weight rows at batch 1 for Q4_1) share
   each load; the weight stream is prefetched 4 KiB ahead (the .cpp header).
   Under AVX512 (F, BW) batches of Q4_1 take two blocks per 512-bit step (1.5-1.9x
   per call at M=8 and 32 on the Xeon host, benchmarks/q8_dot.py): the same
   integer block sums, their float sum in another order.
4. Where the host has AMX-TILE and AMX-INT8 (and Linux grants the tile state),
   batches of 5 rows and more run on the tile unit (q8_dot_amx.cpp): per panel of
   16 weight rows and tile of 16 activation rows, one TDPBUSD (Q4_1) or TDPBSSD
   (Q8_0) per block of 32 gives the 16 x 16 integer block sums, which are scaled
   into float32 accumulators with 512-bit vectors; the next panel's weights are
   prefetched while one computes. The same integer block sums, the float sums in
   another order. A pass over SmolLM2's 30 layers and head with its weights
   streamed from memory (two threads, Xeon host): 32 rows 62.4 -> 19.8 ms, 8 rows
   16.5 -> 11.6 ms; at 4 rows the vector tiles were as fast or faster, so AMX
   starts at 5.

Measured per call (benchmarks/q8_dot.py, one thread, AVX2 host): at batch 1 the
layer shapes stream 12.5-14.6 GB/s and the Q8_0 head 17 GB/s from cache-warm
repeated calls, 1.4-1.6x the first version of this kernel; batches of 8 and 32
1.2-1.4x (compute-bound there: two integer multiplies, a conversion and an FMA
per block and row pair).

Error against the exact product with float activations: the activation rounding,
at most ``dx / 2`` per element, so ``|y - x W^T| <= sum_b (dx_b / 2) sum_{k in b} |w_k|``
plus float32 summation (``q8_dot_reference`` computes the same integer sums in
float64: the kernel agrees with it within float32 accumulation, ~1e-6 relative).

The C++ source is compiled on first use with the host compiler
(kernels/cpu_extension.py: cached, rows split over torch's intra-op threads,
AVX2 where the host has it, else portable scalar code). ``available()`` is
False when no compiler works; callers then keep the int4 kernel.
"""

from __future__ import annotations

import functools
import os

import torch

from tierserve.kernels.cpu_extension import load_cpu_extension

QK = 32
KINDS = {"Q4_1": (0, 20), "Q8_0": (1, 34)}  # kernel kind, bytes per block of 32


@functools.cache
def _extension():
    """The compiled extension, or None when it cannot be built here (logged once)."""
    here = os.path.dirname(__file__)
    ext = load_cpu_extension("tierserve_q8_dot", [os.path.join(here, f) for f in ("q8_dot_cpu.cpp", "q8_dot_amx.cpp")],
                             "integer-dot CPU kernel", vnni=True, avx512=True, amx=True)
    if ext is not None:
        torch.library.register_fake("tierserve::q8_dot_mm")(_fake_q8_dot_mm)  # the library defines the op
    return ext


def available() -> bool:
    """Whether the kernel is built (compiling it on the first call)."""
    return _extension() is not None


def simd() -> bool:
    """Whether the built kernel uses AVX2 (else its scalar loops)."""
    ext = _extension()
    return bool(ext is not None and ext.simd())


def vnni() -> bool:
    """Whether the built kernel's integer dots use VNNI (``vpdpbusd``: the same integer sums in one
    instruction instead of ``maddubs`` and ``madd``; kernels/cpu_extension.py, vnni_flags)."""
    ext = _extension()
    return bool(ext is not None and ext.vnni())


def avx512() -> bool:
    """Whether batches of Q4_1 run the kernel's 512-bit tile (AVX512 F and BW on the host; the .cpp header)."""
    ext = _extension()
    return bool(ext is not None and ext.avx512())


def amx() -> bool:
    """Whether batches (4 rows and more) run on the AMX tile unit (AMX-TILE and AMX-INT8 on the host, the tile
    state granted by Linux; q8_dot_amx.cpp)."""
    ext = _extension()
    return bool(ext is not None and ext.amx())


def _fake_q8_dot_mm(x: torch.Tensor, blocks: torch.Tensor, kind: int) -> torch.Tensor:  # shapes for torch.compile
    return x.new_empty(x.shape[0], blocks.shape[0])


def q8_dot_mm(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """``y [M, N] = x [M, K] W^T`` (float32) for ``W`` given as GGUF ``kind`` blocks ``blocks`` uint8
    ``[N, K / 32 * block_bytes]`` (module docstring). The op ``tierserve::q8_dot_mm`` of torch's dispatcher
    (defined by the extension in C++, its shape function here), so a compiled graph calls it as one extern
    kernel."""
    if torch.compiler.is_compiling():  # traced: the dispatcher's op (defined once ``available()`` built it)
        return torch.ops.tierserve.q8_dot_mm(x, blocks, KINDS[kind][0])
    ext = _extension()
    if ext is None:
        raise RuntimeError("the integer-dot CPU kernel could not be built here (see the log)")
    # eager: the extension's own binding (2 us a call; a boxed call of a dispatcher op from Python: ~18 us)
    return ext.q8_dot_mm(x, blocks, KINDS[kind][0])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization in torch: int codes ``[M, K]`` and float32 scales ``[M, K / 32]``."""
    xb = x.float().reshape(x.shape[0], -1, QK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = xb * inv[..., None]
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # half away from zero, as the C++ kernel
    return q.reshape(x.shape).to(torch.int32), d


def dequantize_blocks(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``q [N, K]`` (int32), scales ``d`` and mins ``m`` ``[N, K / 32]`` (float32; zeros for Q8_0) of
    GGUF ``kind`` blocks (``w = d q + m`` per block)."""
    _, bb = KINDS[kind]
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, bb)
    d = b[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
    if kind == "Q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        qs = b[..., 4:].to(torch.int32)
        q = torch.cat((qs & 15, qs >> 4), dim=-1)
    else:
        m = torch.zeros_like(d)
        q = b[..., 2:].contiguous().view(torch.int8).to(torch.int32)
    return q.reshape(n, -1), d, m


def q8_dot_reference(x: torch.Tensor, blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """What the kernel computes, in float64: the same activation codes and per-block integer sums."""
    xq, dx = quantize_activations(x)
    q, d, m = dequantize_blocks(blocks, kind)
    mm, k = x.shape[0], x.shape[1]
    sums = torch.einsum("mbj,nbj->mnb", xq.reshape(mm, k // QK, QK).double(), q.reshape(-1, k // QK, QK).double())
    sx = dx.double() * xq.reshape(mm, k // QK, QK).sum(-1).double()  # [M, B]
    return (sums * (d.double()[None] * dx.double()[:, None]) + m.double()[None] * sx[:, None]).sum(-1)
