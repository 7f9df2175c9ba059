"""kv4's group codec: 4-bit codes with an fp16 scale and min per group, and the fused page gather.

Per token, head and group of ``g`` consecutive channels (cache/compress/kv4.py
states why and how the pages use it):

    s = fp16((max - min) / 15)   (s = 1 when max == min),   m = fp16(min)
    q = clamp(round((x - m) / s), 0, 15),   x_hat = m + q * s

Two codes per byte: channel 2j in the low nibble of byte j, 2j+1 in the high
one. ``quantize_groups`` / ``dequantize_groups`` are the torch reference.

``gather_dequantized(codes, scale, zero, pages, g)``: the pages ``pages`` of
one layer's K or V, dequantized to float32 ``[n * block_size, heads, D]``. In
torch that is three ``index_select`` and about ten elementwise passes (split
the nibbles, stack them, widen the codes and the fp16 pairs, multiply, add),
each allocating its result: on a 2-core AVX2 host ~0.22 ms for K and as much
for V of SmolLM2's 1040 cached tokens, in every one of its 30 layers. The C++
kernel (kv4_groups_cpu.cpp, built by kernels/cpu_extension.py) reads each
gathered row once and writes its floats once: per 16 code bytes the nibbles
are split, put back in channel order and widened 8 at a time, one FMA with the
group's (scale, min) each; rows split over torch's intra-op threads. Its
output equals the reference bit for bit: ``q * s`` is exact in float32 (a
4-bit integer times an 11-bit fp16 significand), so the FMA and the
reference's multiply-then-add round the same sum once (tested). Tensors on
other devices, traced graphs and hosts without a compiler take the torch
reference.
"""

from __future__ import annotations

import functools
import os

import torch

from tierserve.kernels.cpu_extension import load_cpu_extension


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> packed uint8 ``[..., D/2]``, fp16 scale and min ``[..., D/group]``."""
    *lead, d = x.shape
    xg = x.float().reshape(*lead, d // group, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    scale = ((hi - lo) / 15).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = lo.to(torch.float16)
    q = torch.round((xg - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*lead, d // 2, 2)
    return q[..., 0] | (q[..., 1] << 4), scale, zero


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of ``quantize_groups``: fp32 ``[..., D]``."""
    *lead, half = packed.shape
    q = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*lead, 2 * half // group, group)
    return (zero.float()[..., None] + q.float() * scale.float()[..., None]).reshape(*lead, 2 * half)


def gather_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, pages: torch.Tensor,
                     group: int) -> torch.Tensor:
    """Pages ``pages [n]`` of ``codes [NB, BS, H, D/2]`` (and their scale, zero) dequantized:
    ``[n * BS, H, D]`` float32, in torch."""
    parts = [torch.index_select(t, 0, pages) for t in (codes, scale, zero)]
    x = dequantize_groups(*parts, group)
    return x.reshape(-1, *x.shape[-2:])


@functools.cache
def _extension():
    return load_cpu_extension("tierserve_kv4_groups", os.path.join(os.path.dirname(__file__), "kv4_groups_cpu.cpp"),
                              "kv4 gather CPU kernel")


def kernel_available() -> bool:
    """Whether the C++ kernel is built (compiling it on the first call)."""
    return _extension() is not None


def gather_dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, pages: torch.Tensor,
                       group: int) -> torch.Tensor:
    """``gather_reference``'s result; by the C++ kernel for CPU tensors where it is built (module doc)."""
    if codes.device.type == "cpu" and not torch.compiler.is_compiling():
        ext = _extension()
        if ext is not None:
            return ext.kv4_gather(codes, scale, zero, pages.reshape(-1).to(torch.long), group)
    return gather_reference(codes, scale, zero, pages.reshape(-1), group)
