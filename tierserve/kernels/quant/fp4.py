"""E2M1 (FP4) element codec and the nearest-on-a-grid rounding shared with the E4M3 scale codec.

E2M1 (OCP Microscaling spec, the element type of MXFP4 and NVFP4) has 1 sign,
2 exponent and 1 mantissa bit. Code ``c`` in 0..15: bit 3 is the sign, bits
0..2 index the magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``. No inf or NaN.

Encoding a real value ``v`` (already divided by its group scale):

* the magnitude is rounded to the nearest grid value; **ties go to the even
  code** (mantissa bit 0), i.e. IEEE round-to-nearest-even: 0.25 -> 0,
  0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4;
* magnitudes above 6 saturate to 6 (code 7);
* the sign bit copies ``signbit(v)``, so a small negative value encodes as
  -0 (code 8), which decodes to -0.0.

Inputs must be finite (NaN has no E2M1 code).

Packing: two codes per byte, element ``2j`` in the low nibble and ``2j+1`` in
the high nibble (the layout of ``torch.float4_e2m1fn_x2`` and of the OCP/NVIDIA
FP4 tensors).

``fp4_linear_reference`` is the torch reference of the packed FP4 matmul
(``fp4_triton.fp4_linear_triton``): decode codes and scale bytes (through a
256-entry table of effective scales), then ``F.linear`` in float32; with
``ActQuant`` activations (W4A4) the activations are decoded the same way.

``round_e2m1`` computes the same rounding arithmetically in the value domain
(``torch.round(|v| / step) * step`` with step 0.5, 1, 2 on [0,2), [2,4), [4,6];
``torch.round`` rounds half to even, which is the even-code tie rule); the
codes are then read off the value. Tests check it against a brute-force
nearest over the 16 values.

``round_to_grid`` is the generic "nearest of an increasing non-negative grid,
ties to the even index, saturate at the top" rounding; the E4M3 scale codec in
``nvfp4.py`` uses it with the 127 finite non-negative E4M3 values, where the
index parity is the mantissa's last bit, so it is also round-to-nearest-even.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
SIGN_BIT = 8


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 decoded values, indexed by code (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def round_to_grid(mag: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of ``grid`` (increasing, >= 0) to each ``mag`` >= 0.

    Ties (``mag`` exactly at a midpoint) go to the even index; values past the
    last grid point saturate to the last index. Returns int64 indices.
    """
    grid = grid.to(torch.float64)
    mids = ((grid[:-1] + grid[1:]) / 2).to(mag.dtype)  # exact for fp8/fp4 grids in fp32
    lo = torch.bucketize(mag, mids, right=False)  # number of midpoints strictly below mag
    at = mids[lo.clamp(max=mids.numel() - 1)]
    tie = (lo < mids.numel()) & (mag == at) & (lo % 2 == 1)
    return lo + tie.to(lo.dtype)


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """``decode(encode(v))`` computed arithmetically (the fast path of the scale search and GPTQ).

    The E2M1 grid has step 0.5 on [0, 2), 1 on [2, 4) and 2 on [4, 6]; scaling
    by the inverse step and ``torch.round`` (half to even) gives the nearest
    grid value with ties to the even code, exactly as ``encode_e2m1``.
    """
    v = v.float()
    mag = v.abs().clamp(max=E2M1_MAX)
    inv_step = torch.where(mag < 2, 2.0, torch.where(mag < 4, 1.0, 0.5))
    return torch.copysign(torch.round(mag * inv_step) / inv_step, v)


def encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, 0..15) of finite values ``v`` (see module docstring for the rounding rule)."""
    q = round_e2m1(v)
    mag = q.abs()
    idx = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4))
    sign = torch.signbit(v.float()).to(torch.uint8) * SIGN_BIT
    return idx.to(torch.uint8) + sign


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 codes 0..15."""
    return e2m1_table(codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 codes -> [..., n] bytes (element 2j low nibble, 2j+1 high nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] uint8 codes (inverse of ``pack_fp4``)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``w [G, gs]`` divided by per-group ``scale [G]`` (a zero scale gives code 0)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = encode_e2m1(w / safe[:, None])
    return torch.where((scale > 0)[:, None], codes, torch.zeros_like(codes))


def fake_quantize_groups(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dequantize_groups(quantize_groups(w, scale), scale)`` without materialising codes."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    return torch.where((scale > 0)[:, None], round_e2m1(w / safe) * safe, torch.zeros_like(w))


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``decode(codes [G, gs]) * scale [G]`` in float32."""
    return decode_e2m1(codes) * scale[:, None]


@dataclass
class ActQuant:
    """FP4-quantized activations: ``qs`` uint8 [M, K/2] packed codes, ``scale`` fp32 [M, K/group]."""

    qs: torch.Tensor
    scale: torch.Tensor
    group: int

    def dequantize(self) -> torch.Tensor:
        return decode_e2m1(unpack_fp4(self.qs)) * self.scale.repeat_interleave(self.group, dim=1)


def fp4_linear_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, scale_table: torch.Tensor,
                         group: int, bias: torch.Tensor | None = None, act: ActQuant | None = None) -> torch.Tensor:
    """``a W^T + b`` in float32: W from ``qs [N, K/2]`` and scale bytes ``scales [N, K/group]`` decoded
    through ``scale_table [256]``; ``a`` is ``x [M, K]`` (W4A16) or ``act`` dequantized (W4A4)."""
    w = decode_e2m1(unpack_fp4(qs)) * scale_table[scales.long()].repeat_interleave(group, dim=1)
    a = x.float() if act is None else act.dequantize()
    return torch.nn.functional.linear(a, w, None if bias is None else bias.float())
