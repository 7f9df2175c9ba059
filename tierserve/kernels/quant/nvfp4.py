"""NVFP4: E2M1 elements in groups of 16, an E4M3 scale per group and an fp32 per-tensor global scale.

For a weight with max magnitude ``A`` (after the optional Hadamard) the global
scale is ``g = 448 * 6 / A`` (fp32; ``g = 1`` for an all-zero tensor). A group
with max magnitude ``amax`` stores the byte ``e4m3(fp32((amax / 6) * g))`` --
the ``torch.float8_e4m3fn`` encoding, round-to-nearest-even, saturating at 448
-- and its elements are E2M1 codes of ``w / s`` with the effective scale
``s = decode_e4m3(byte) / g``. Dequantize ``decode_e2m1(code) * s``. Groups
whose scale underflows E4M3 (byte 0) dequantize to zero.

The E4M3 codec is implemented here (not by calling torch's cast): the 127
finite non-negative E4M3 values (code c: exponent c >> 3, mantissa c & 7,
value mantissa * 2^-9 when the exponent is 0 else (1 + mantissa/8) * 2^(e-7))
form a grid and ``fp4.round_to_grid`` rounds to the nearest, ties to the even
code, which is IEEE round-to-nearest-even. Tests check the bytes bit-exactly
against torch's ``float8_e4m3fn`` cast over normal, subnormal, tie and
saturating magnitudes.

W4A4 activations use the same format per row: a dynamic per-row global scale
``448 * 6 / amax(row)`` (per row, not per batch, so a token's result does not
depend on the other tokens of its batch), E4M3 group scales, E2M1 codes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tierserve.kernels.quant.base import register_format
from tierserve.kernels.quant.fp4 import E2M1_MAX, round_to_grid
from tierserve.kernels.quant.fp4_format import FP4Format

NV_GROUP = 16
E4M3_MAX = 448.0
E4M3_NAN_CODE = 0x7F
E4M3_SIGN = 0x80


def e4m3_grid(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 values of the finite non-negative E4M3 codes 0..126 (increasing)."""
    c = torch.arange(E4M3_NAN_CODE, dtype=torch.int32, device=device)
    exp, man = c >> 3, c & 7
    ones = torch.ones(c.shape, dtype=torch.float32, device=device)
    sub = torch.ldexp(man.float(), torch.full_like(c, -9))
    norm = torch.ldexp(ones + man.float() / 8, exp - 7)
    return torch.where(exp == 0, sub, norm)


def e4m3_encode(v: torch.Tensor) -> torch.Tensor:
    """uint8 E4M3 (fn) bytes of finite float values: nearest, ties to even, saturating at +-448."""
    v = v.float()
    idx = round_to_grid(v.abs(), e4m3_grid(v.device))
    sign = torch.signbit(v).to(torch.int64) * E4M3_SIGN
    return (idx + sign).to(torch.uint8)


def e4m3_decode(byte: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 (fn) bytes; 0x7F and 0xFF decode to NaN."""
    b = byte.long()
    grid = torch.cat([e4m3_grid(byte.device), torch.tensor([float("nan")], device=byte.device)])
    mag = grid[b & 0x7F]
    return torch.where((b & E4M3_SIGN) != 0, -mag, mag)


def nv_global_scale(amax_tensor: torch.Tensor) -> torch.Tensor:
    """fp32 ``448 * 6 / amax`` (1.0 when amax is 0); shape of ``amax_tensor``."""
    a = amax_tensor.float()
    num = torch.tensor(E4M3_MAX * E2M1_MAX, dtype=torch.float32, device=a.device)
    return torch.where(a > 0, num / torch.where(a > 0, a, torch.ones_like(a)), torch.ones_like(a))


@register_format
class NVFP4Format(FP4Format):
    """NVFP4 weights; options ``hadamard``, ``mse``, ``act_quant`` (W4A4), ``gptq``, ``qronos``."""

    name: ClassVar[str] = "nvfp4"
    group_size: ClassVar[int] = NV_GROUP

    def global_scale(self, amax_tensor: torch.Tensor) -> torch.Tensor | None:
        return nv_global_scale(amax_tensor)

    def encode_scales(self, amax: torch.Tensor, gscale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        byte = e4m3_encode((amax.float() / E2M1_MAX) * gscale)
        return byte, self.decode_scales(byte, gscale)

    def decode_scales(self, byte: torch.Tensor, gscale: torch.Tensor | None) -> torch.Tensor:
        return e4m3_decode(byte) / gscale
