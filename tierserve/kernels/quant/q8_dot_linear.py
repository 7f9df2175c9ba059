"""``Q8DotLinear``: a Q4_1 or Q8_0 linear that keeps its GGUF blocks and multiplies by integer dots.

The CPU fast path of those formats where the integer-dot kernel builds
(kernels/quant/q8_dot_cpu.py; otherwise int4_cpu.py's torch int4 pack stays):
the module holds the format's own blocks (the ``QuantizedLinear``'s buffer, no
copy: 5 bits per weight for Q4_1, 8.5 for Q8_0, so a tied Q8_0 LM head shares
the embedding's bytes) and computes ``x W^T + b`` in float32 with activations
quantized to 8 bits per block of 32 (the kernel's error bound: ``dx / 2`` per
activation element). Inputs of any float dtype and leading shape; the output
has the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.ggml_blocks import BLOCKS_KEY
from tierserve.kernels.quant.q8_dot_cpu import KINDS, q8_dot_mm

FORMAT_KINDS = {"q4_1": "Q4_1", "q8_0": "Q8_0"}


class Q8DotLinear(nn.Module):
    def __init__(self, fmt_name: str, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind = FORMAT_KINDS[fmt_name]
        self.fmt_name = fmt_name
        self.out_features, self.in_features = int(packed.shape[0]), int(packed.shape[1])
        row_bytes = self.in_features // 32 * KINDS[self.kind][1]
        self.register_buffer("blocks", packed.tensors[BLOCKS_KEY].reshape(self.out_features, row_bytes))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = q8_dot_mm(x.reshape(-1, self.in_features).float(), self.blocks, self.kind)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"format={self.fmt_name}, in_features={self.in_features}, out_features={self.out_features}"
