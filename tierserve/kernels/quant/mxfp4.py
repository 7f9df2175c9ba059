"""MXFP4 (OCP Microscaling): E2M1 elements in groups of 32 sharing one E8M0 power-of-two scale.

Scale of a group with max magnitude ``amax`` (``fp4_format.FP4Format`` does the
rest: grouping along the input dimension, optional block Hadamard, MSE search,
GPTQ, W4A4):

* ``scale_rule="nonclipping"`` (**default**, the FP-Quant / MR-GPTQ reference
  code's 4/3 factor): ``scale = 2^(floor(log2(amax * 4/3)) - 2)``, so
  ``amax / scale`` lies in [3, 6) and no element clips. The floor is taken
  exactly from ``frexp(amax) = (m, e)``: ``floor(log2(amax*4/3)) = e`` if
  ``m >= 0.75`` else ``e - 1`` (no rounding of 4/3).
* ``scale_rule="ocp"`` (the OCP MX v1.0 spec, TECHNIQUES.md's formula):
  ``scale = 2^(floor(log2 amax) - 2)``; ``amax / scale`` lies in [4, 8) and
  elements above 6 * scale clip to +-6 * scale.

E8M0 byte = exponent + 127, clamped to [0, 254] (byte 255 is NaN); an all-zero
group gets byte 0 (2^-127). Decoding is ``ldexp(1, byte - 127)`` (exact, also
in the fp32 subnormal range). Tests check the bytes against torch's
``float8_e8m0fnu`` cast of the same power of two, over fp32 normal,
subnormal and saturating magnitudes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import register_format
from tierserve.kernels.quant.fp4_format import FP4Format

MX_GROUP = 32
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_RULES = ("nonclipping", "ocp")


def mx_scale_exponent(amax: torch.Tensor, rule: str = "nonclipping") -> torch.Tensor:
    """int32 exponent k of the group scale 2^k (see module docstring), clamped to [-127, 127]."""
    m, e = torch.frexp(amax.float())
    floor_log2 = e - 1
    if rule == "nonclipping":
        floor_log2 = torch.where(m >= 0.75, e, e - 1)
    k = floor_log2 - 2
    k = torch.where(amax > 0, k, torch.full_like(k, -E8M0_BIAS))
    return k.clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bytes of scales 2^exponent (exponent already in [-127, 127])."""
    return (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(byte: torch.Tensor) -> torch.Tensor:
    """float32 2^(byte - 127); byte 255 decodes to NaN."""
    b = byte.to(torch.int32)
    val = torch.ldexp(torch.ones(b.shape, dtype=torch.float32, device=b.device), b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN, torch.full_like(val, float("nan")), val)


@register_format
class MXFP4Format(FP4Format):
    """MXFP4 weights; options ``hadamard``, ``mse``, ``act_quant`` (W4A4), ``gptq``, ``qronos``, ``scale_rule``."""

    name: ClassVar[str] = "mxfp4"
    group_size: ClassVar[int] = MX_GROUP

    def __init__(self, hadamard: bool = False, mse: bool = False, act_quant: bool = False, gptq: bool = False,
                 scale_rule: str = "nonclipping", qronos: bool = False):
        super().__init__(hadamard=hadamard, mse=mse, act_quant=act_quant, gptq=gptq, qronos=qronos)
        if scale_rule not in SCALE_RULES:
            raise InvalidParameterError("scale_rule", f"must be one of {list(SCALE_RULES)}, got {scale_rule!r}")
        self.scale_rule = scale_rule

    def global_scale(self, amax_tensor: torch.Tensor) -> torch.Tensor | None:
        return None

    def encode_scales(self, amax: torch.Tensor, gscale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        byte = e8m0_encode(mx_scale_exponent(amax, self.scale_rule))
        return byte, e8m0_decode(byte)

    def decode_scales(self, byte: torch.Tensor, gscale: torch.Tensor | None) -> torch.Tensor:
        return e8m0_decode(byte)
