"""Q8_0 (llama.cpp ``quantize_row_q8_0_ref``): int8 codes with one fp16 scale per block of 32.

Per block of 32 weights x (34 bytes: fp16 d, then 32 int8 codes):

    d  = max|x| / 127      (float32; stored rounded to fp16)
    id = 1 / d, or 0 when d == 0
    q  = roundf(x * id)    (round half away from zero, computed as ggml/gguf-py do:
                            sign(v) * (floor(|v|) + floor(2 * (|v| - floor(|v|)))))
    dequantize: x' = q * fp16(d)

SmolLM2's GGUF stores its (tied) token embedding in this format. Tests check
byte equality with gguf-py (zero blocks, .5 ties, fp16 rounding, random and
real weights). Layout and matmul paths: ``ggml_blocks.py``; the fused triton
kernel: ``q8_0_triton.py``.
"""

from __future__ import annotations

import torch

from tierserve.kernels.quant.base import register_format
from tierserve.kernels.quant.ggml_blocks import GGMLBlockFormat, fp16_bytes, fp16_from_bytes

Q8_0_TYPE_SIZE = 34


def _roundf(v: torch.Tensor) -> torch.Tensor:
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2.0 * (a - fl)))


def q8_0_quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> uint8 [n, 34] ggml Q8_0 blocks."""
    d = x.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _roundf(x * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), q], dim=-1)


def q8_0_dequantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 34] -> float32 [n, 32]: q * d."""
    d = fp16_from_bytes(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


@register_format
class Q8_0Format(GGMLBlockFormat):
    name = "q8_0"
    ggml_type = "Q8_0"
    type_size = Q8_0_TYPE_SIZE
    quantize_blocks = staticmethod(q8_0_quantize_blocks)
    dequantize_blocks = staticmethod(q8_0_dequantize_blocks)

    @staticmethod
    def triton_linear():
        from tierserve.kernels.quant.q8_0_triton import q8_0_linear_triton

        return q8_0_linear_triton

    @staticmethod
    def triton_planes_linear():
        from tierserve.kernels.quant.q8_0_triton import q8_0_linear_planes

        return q8_0_linear_planes
