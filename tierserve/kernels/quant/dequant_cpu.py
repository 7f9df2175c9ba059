"""CPU matmul by row-chunked dequantization: never widens the whole weight, reads only the packed bytes.

``y = x W^T + b`` for a packed W: the output rows (W's rows) are cut into
chunks of ``rows = max(1, CHUNK_BYTES // (4 * in_features))`` (CHUNK_BYTES =
256 KiB, so one chunk of float32 weights stays in L2); each chunk is decoded
into one float32 buffer allocated once per call and reused for every chunk,
then ``torch.mm(buf, x^T, out=y^T[rows])`` writes its slice of the output.
The float32 math is the reference's (dequantize, then a float32 matmul), so
results equal the reference up to summation order; a transient of
``rows x in`` floats replaces the reference's full ``out x in`` one.

Row decoders (``ChunkedDequantLinear.decode_rows_into``):
- Q8_0 (``Q8_0ChunkedLinear``): the chunk's fp16 block scales widened to
  float32 (``r * in/32`` values), then ``torch.mul(codes int8 [r, nb, 32],
  d [r, nb, 1], out=buf)``, one pass over the codes.
- FP4 (``fp4_cpu.FP4LutLinear``): a 256-entry table of value pairs per byte.

The module keeps the format's packed tensors as they are (the same tensors, no
copy: a Q8_0 embedding and its tied LM head still share one buffer), so its
memory is the format's own ``nbytes`` plus the decoder's small tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.ggml_blocks import BLOCK, BLOCKS_KEY

CHUNK_BYTES = 1 << 18


def chunk_rows(in_features: int) -> int:
    return max(1, CHUNK_BYTES // (4 * in_features))


class ChunkedDequantLinear(nn.Module, ABC):
    """Base: subclasses decode rows ``[lo, hi)`` of W into a float32 ``[hi - lo, in]`` buffer."""

    def __init__(self, fmt_name: str, shape: tuple[int, int], bias: torch.Tensor | None):
        super().__init__()
        self.fmt_name = fmt_name
        self.out_features, self.in_features = shape
        self.register_buffer("bias", None if bias is None else bias.detach())

    @abstractmethod
    def decode_rows_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Write rows ``[lo, hi)`` of W as float32 into ``out [hi - lo, in]`` (contiguous)."""

    def prepare_input(self, x2: torch.Tensor) -> torch.Tensor:
        """Hook for formats that transform activations first (rotation, W4A4); identity here."""
        return x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self.prepare_input(x.reshape(-1, self.in_features)).float()
        xt = x2.t()
        n = self.out_features
        rows = min(chunk_rows(self.in_features), n)
        buf = torch.empty(rows, self.in_features)
        yt = torch.empty(n, x2.shape[0])
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            w = buf[:hi - lo]
            self.decode_rows_into(lo, hi, w)
            torch.mm(w, xt, out=yt[lo:hi])
        y = yt.t().to(x.dtype).reshape(*lead, n)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"format={self.fmt_name}, in_features={self.in_features}, out_features={self.out_features}, "
                f"chunk_rows={chunk_rows(self.in_features)}")


class Q8_0ChunkedLinear(ChunkedDequantLinear):
    """Q8_0 blocks kept as they are (the GGUF bytes)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__("q8_0", packed.shape, bias)
        self.register_buffer("blocks", packed.tensors[BLOCKS_KEY])

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def decode_rows_into(self, lo: int, hi: int, out: torch.Tensor) -> None:
        blocks = self.blocks[lo:hi].view(hi - lo, self.in_features // BLOCK, 34)
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()
        torch.mul(blocks[..., 2:].view(torch.int8), d, out=out.view(blocks.shape[0], blocks.shape[1], BLOCK))
