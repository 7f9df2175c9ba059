"""Q4_0 (llama.cpp ``quantize_row_q4_0_ref``): 4-bit codes with one fp16 scale per block of 32.

Per block of 32 weights x (18 bytes: fp16 d, then 16 bytes of codes):

    m  = the element of largest |x| (first one on ties), with its sign
    d  = m / -8            (float32; stored rounded to fp16)
    id = 1 / d, or 0 when d == 0
    q  = min(15, trunc(x * id + 8.5))          (float32 arithmetic, as ggml)
    byte j = q[j] | q[j + 16] << 4              (low nibbles: first half)
    dequantize: x' = (q - 8) * fp16(d)

The code uses the unrounded float32 ``id`` while the stored d is fp16, as ggml
does. A zero block has d = 0 / -8 = -0.0, stored as bytes ``00 80``, codes 8.
The format is used by Google's QAT Gemma GGUFs. Tests check byte equality with
gguf-py's ``gguf.quants.quantize(..., GGMLQuantizationType.Q4_0)`` and equality
of ``dequantize`` (zero blocks, .5 ties, fp16 rounding of the scale, blocks whose
extreme is negative or positive, random and real SmolLM2 weights). Layout and
matmul paths: ``ggml_blocks.py``; the fused triton kernel: ``q4_0_triton.py``.
Options ``imatrix=True`` (importance-weighted scale search) and ``gptq=True`` (GPTQ
rounding) or ``qronos=True`` (Qronos rounding, qronos.py) need calibration activations and still emit plain Q4_0 blocks
(``q4_0_calibrated.py``); without them ``quantize`` is the byte-exact reference.
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, register_format
from tierserve.kernels.quant.ggml_blocks import (GGMLBlockFormat, fp16_bytes, fp16_from_bytes, pack_nibbles,
                                                 unpack_nibbles)

Q4_0_TYPE_SIZE = 18


def q4_0_quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> uint8 [n, 18] ggml Q4_0 blocks."""
    imax = x.abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(x, -1, imax)
    d = m / -8.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(x * inv + 8.5).to(torch.uint8).clamp_(0, 15)
    return torch.cat([fp16_bytes(d), pack_nibbles(q)], dim=-1)


def q4_0_dequantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 18] -> float32 [n, 32]: (q - 8) * d."""
    d = fp16_from_bytes(blocks[:, :2])
    q = unpack_nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


@register_format
class Q4_0Format(GGMLBlockFormat):
    """Q4_0; ``imatrix`` / ``gptq`` choose scales and codes from calibration (q4_0_calibrated.py)."""

    name = "q4_0"
    ggml_type = "Q4_0"
    type_size = Q4_0_TYPE_SIZE
    quantize_blocks = staticmethod(q4_0_quantize_blocks)
    dequantize_blocks = staticmethod(q4_0_dequantize_blocks)

    def __init__(self, imatrix: bool = False, gptq: bool = False, qronos: bool = False):
        self.imatrix = bool(imatrix)
        self.gptq = bool(gptq)
        self.qronos = bool(qronos)
        if self.gptq and self.qronos:
            raise InvalidParameterError("options", "gptq and qronos are alternative roundings; set one of them")
        self.needs_calibration = self.imatrix or self.gptq or self.qronos  # transform.quantize_model's hook
        self.paired_calibration = self.qronos  # calibration must give PairedInputs (tools/sequential_calibration)

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight",
                 activations: torch.Tensor | None = None) -> PackedWeight:
        """Reference RTN (byte-exact with gguf-py); with ``imatrix``/``gptq`` the calibrated choice."""
        if not self.needs_calibration:
            return super().quantize(weight, tensor_name)
        self.check_shape(tensor_name, tuple(weight.shape))
        reference = None
        if self.qronos:
            from tierserve.kernels.quant.qronos import paired_inputs

            pair = paired_inputs(activations, tensor_name, weight.shape[1])
            activations, reference = pair.quant_inputs, pair.float_inputs
        if activations is None:
            raise InvalidParameterError("calibration", f"q4_0 with imatrix/gptq needs calibration activations "
                                                       f"for {tensor_name!r}")
        if activations.shape[-1] != weight.shape[1]:
            raise InvalidParameterError(f"{tensor_name}.activations", f"must have {weight.shape[1]} features, "
                                                                      f"got {activations.shape[-1]}")
        from tierserve.kernels.quant.q4_0_calibrated import quantize_calibrated

        blocks = quantize_calibrated(weight, activations, self.imatrix, self.gptq or self.qronos, reference)
        return self.from_blocks(blocks, tuple(weight.shape), tensor_name)

    @staticmethod
    def triton_linear():
        from tierserve.kernels.quant.q4_0_triton import q4_0_linear_triton

        return q4_0_linear_triton

    @staticmethod
    def triton_planes_linear():
        from tierserve.kernels.quant.q4_0_triton import q4_0_linear_planes

        return q4_0_linear_planes
