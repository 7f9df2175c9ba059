"""CPU fast paths for the FP4 formats (MXFP4, NVFP4): int4-pair for MXFP4, LUT row chunks for both.

Activations first go through what the format's reference ``linear`` does:
the block Hadamard when ``meta["hadamard"]`` (x R), and with W4A4
(``act_quant``) FP4 quantize-dequantize per row and group
(``fmt.quantize_activations(x).dequantize()``).

**MXFP4 as two int4 matrices** (``MXFP4Int4Linear``, the default CPU path).
An E2M1 code has sign s and magnitude index i in 0..7 with values
``{0, .5, 1, 1.5, 2, 3, 4, 6}``. Exactly, ``v(i) = (i + b(i)) / 2`` with
``b = {0, 0, 0, 0, 0, 1, 2, 5}``, so with ``A = s i`` in [-7, 7] and ``B = s b(i)``
in [-5, 5] a group with scale ``2^k`` is ``2^(k-1) (A + B)``. A and B are
stored as int4 codes ``A + 8`` / ``B + 8`` in torch's int4 CPU pack
(``int4_cpu.py``: group 32, scale ``2^(k-1)``, zero 0; a power of two is exact
in bf16) and ``y = mm(x, A) + mm(x, B)`` with one shared scale tensor. The
only departures from the reference are the bf16 rounding of x and of each
partial y (int4_cpu computes in bf16). Memory: two int4 code tensors + one
bf16 scale/zero tensor = 9 bits per weight, against MXFP4's own 4.25 (the
price of the int4 kernels: about 2x the packed bytes, still 3.6x below fp32).

**LUT row chunks** (``FP4LutLinear``; the NVFP4 CPU path, and an MXFP4
option that keeps the 4.25-bit form). NVFP4's groups of 16 cannot use the
int4 kernel (its smallest group is 32, and the E4M3 / global scale is not a
bf16 value). The format's ``qs`` / ``scales`` bytes are kept unchanged; rows
are decoded in chunks (``dequant_cpu.ChunkedDequantLinear``): every code byte
indexes a float32 ``[256, 2]`` table of its two E2M1 values (one 1-D
``index_select`` of the pairs viewed as int64, int32 indices: measured 4.4x
faster than gathering rows of the float table), and each group is multiplied
by its effective scale, read from the format's 256-entry ``scale_table`` (the
NVFP4 global scale included). Float32 throughout: equal to the reference up
to summation order.
"""

from __future__ import annotations

import torch
from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.dequant_cpu import ChunkedDequantLinear
from tierserve.kernels.quant.fp4 import e2m1_table
from tierserve.kernels.quant.fp4_format import FP4Format
from tierserve.kernels.quant.hadamard import block_hadamard
from tierserve.kernels.quant.int4_cpu import INT4_OFFSET, Int4CpuLinear, pack_int4

MX_INT4_GROUP = 32
_B_OF_INDEX = (0, 0, 0, 0, 0, 1, 2, 5)  # v(i) = (i + b(i)) / 2 on the E2M1 magnitudes


def prepare_fp4_input(fmt: FP4Format, meta: dict, x2: torch.Tensor) -> torch.Tensor:
    """What the reference does to activations: optional Hadamard, optional FP4 fake-quant (W4A4)."""
    if meta.get("hadamard"):
        x2 = block_hadamard(x2, fmt.group_size)
    if fmt.act_quant or meta.get("act_quant"):
        x2 = fmt.quantize_activations(x2).dequantize().to(x2.dtype)
    return x2


def pair_table() -> torch.Tensor:
    """float32 [256, 2]: the E2M1 values of a byte's low and high nibble."""
    t, b = e2m1_table(), torch.arange(256)
    return torch.stack([t[b & 0x0F], t[b >> 4]], dim=-1).contiguous()


class FP4LutLinear(ChunkedDequantLinear):
    """MXFP4/NVFP4 bytes kept as they are; rows decoded through a byte-pair table (module docstring)."""

    def __init__(self, fmt: FP4Format, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__(fmt.name, packed.shape, bias)
        self.fmt, self.meta, self.group = fmt, dict(packed.meta), fmt.group_size
        self.register_buffer("qs", packed.tensors["qs"])
        self.register_buffer("scales", packed.tensors["scales"])
        self.register_buffer("pairs", pair_table())
        self.register_buffer("scale_table", fmt.scale_table(packed))

    @property
    def nbytes(self) -> int:
        """Packed bytes plus the two decode tables (2 KiB + 1 KiB)."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.pairs, self.scale_table))

    def prepare_input(self, x2: torch.Tensor) -> torch.Tensor:
        return prepare_fp4_input(self.fmt, self.meta, x2)

    def decode_rows_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        r = hi - lo
        idx = self.qs[lo:hi].reshape(-1).to(torch.int32)
        # each float32 pair moves as one int64, so the gather is 1-D (4x faster than a [256, 2] row gather)
        torch.index_select(self.pairs.view(torch.int64).reshape(-1), 0, idx, out=out.view(torch.int64).reshape(-1))
        scale = torch.index_select(self.scale_table, 0, self.scales[lo:hi].reshape(-1).to(torch.int32))
        out.view(r, -1, self.group).mul_(scale.view(r, -1, 1))


def mx_int4_codes(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 bytes [N, K/2] -> int4 codes (A + 8, B + 8), each int32 [N, K] (module docstring)."""
    lo, hi = qs & 0x0F, qs >> 4
    codes = torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int32)
    mag, neg = codes & 7, (codes & 8) != 0
    b = torch.tensor(_B_OF_INDEX, dtype=torch.int32)[mag]
    sign = torch.where(neg, -1, 1).to(torch.int32)
    return sign * mag + INT4_OFFSET, sign * b + INT4_OFFSET


class MXFP4Int4Linear(Int4CpuLinear):
    """MXFP4 as two int4-packed matrices sharing one bf16 scale tensor (module docstring)."""

    def __init__(self, fmt: FP4Format, packed: PackedWeight, bias: torch.Tensor | None = None):
        a, b = mx_int4_codes(packed.tensors["qs"])
        half_scale = fmt.decode_scales(packed.tensors["scales"], None).float() / 2
        zero = torch.zeros_like(half_scale)
        pa, sz = pack_int4(a, half_scale, zero, MX_INT4_GROUP)
        pb, _ = pack_int4(b, half_scale, zero, MX_INT4_GROUP)
        super().__init__(fmt.name, [(pa, sz), (pb, sz)], MX_INT4_GROUP, packed.shape, bias)
        self.fmt, self.meta = fmt, dict(packed.meta)

    def prepare_input(self, x2: torch.Tensor) -> torch.Tensor:
        return prepare_fp4_input(self.fmt, self.meta, x2)
