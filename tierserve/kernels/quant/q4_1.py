"""Q4_1 (llama.cpp ``quantize_row_q4_1_ref``): 4-bit codes with fp16 scale and minimum per block of 32.

Per block of 32 weights x (20 bytes: fp16 d, fp16 m, then 16 bytes of codes):

    lo, hi = min(x), max(x)
    d  = (hi - lo) / 15    (float32; stored rounded to fp16)
    id = 1 / d, or 0 when d == 0
    q  = min(15, trunc((x - lo) * id + 0.5))    (float32 arithmetic, as ggml)
    m  = lo stored as fp16
    byte j = q[j] | q[j + 16] << 4              (low nibbles: first half)
    dequantize: x' = fp16(d) * q + fp16(m)

SmolLM2-135M-Instruct's GGUF stores its linear weights in this format. Tests
check byte equality with gguf-py's quantize/dequantize (constant and zero
blocks, fp16 rounding, random and real weights) and that the GGUF tensors load
packed unchanged. Layout and matmul paths: ``ggml_blocks.py``; the fused
triton kernel: ``q4_1_triton.py``.
"""

from __future__ import annotations

import torch

from tierserve.kernels.quant.base import register_format
from tierserve.kernels.quant.ggml_blocks import (GGMLBlockFormat, fp16_bytes, fp16_from_bytes, pack_nibbles,
                                                 unpack_nibbles)

Q4_1_TYPE_SIZE = 20


def q4_1_quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 32] -> uint8 [n, 20] ggml Q4_1 blocks."""
    lo = x.min(dim=-1, keepdim=True).values
    hi = x.max(dim=-1, keepdim=True).values
    d = (hi - lo) / 15.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((x - lo) * inv + 0.5).to(torch.uint8).clamp_(0, 15)
    return torch.cat([fp16_bytes(d), fp16_bytes(lo), pack_nibbles(q)], dim=-1)


def q4_1_dequantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 20] -> float32 [n, 32]: d * q + m."""
    d = fp16_from_bytes(blocks[:, 0:2])
    m = fp16_from_bytes(blocks[:, 2:4])
    return d * unpack_nibbles(blocks[:, 4:]).float() + m


@register_format
class Q4_1Format(GGMLBlockFormat):
    name = "q4_1"
    ggml_type = "Q4_1"
    type_size = Q4_1_TYPE_SIZE
    num_meta = 2  # d and m (fp16) head each block
    quantize_blocks = staticmethod(q4_1_quantize_blocks)
    dequantize_blocks = staticmethod(q4_1_dequantize_blocks)

    @staticmethod
    def triton_linear():
        from tierserve.kernels.quant.q4_1_triton import q4_1_linear_triton

        return q4_1_linear_triton

    @staticmethod
    def triton_planes_linear():
        from tierserve.kernels.quant.q4_1_triton import q4_1_linear_planes

        return q4_1_linear_planes
