"""XQuant-CL's delta pages: one layer's stored deltas as b-bit codes (xquant_cl.py states where deltas come from).

Codec (mid-rise, no zero level: the rotated deltas are centred and a group's 2^b levels all carry
information, as many as an asymmetric codec's over [min, max] with the same step, at one fp16 number
per group instead of two), per group of ``g`` consecutive channels after a block Hadamard rotation ``H``
of size ``g`` of the channel-weighted delta ``y = H (w * d)``: ``h = 2^(b-1)``,
``s = fp16(max |y| / (h - 1/2))``, ``q = clamp(floor(y / s), -h, h - 1) + h`` stored,
``y^ = (q - h + 1/2) s``; |y - y^| <= s/2 inside the range. Codes bit-packed little-endian (code j
occupies bits ``j*b .. j*b+b-1`` of the row): ``hidden * b / 8`` bytes plus ``2 * hidden / g`` of scales
per token. ``bits`` 0 stores the deltas in fp32 (lossless).
"""

from __future__ import annotations

import torch

from tierserve.kernels.quant.hadamard import hadamard_matrix


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (< 2^bits) -> ``[..., n * bits / 8]`` bytes, code j at bits j*b.. of the row."""
    *lead, n = q.shape
    planes = (q[..., None] >> torch.arange(bits, dtype=torch.uint8, device=q.device)) & 1
    planes = planes.reshape(*lead, n * bits // 8, 8)
    return (planes << torch.arange(8, dtype=torch.uint8, device=q.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 codes ``[..., 8 * bytes / bits]``."""
    *lead, nbytes = packed.shape
    planes = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    planes = planes.reshape(*lead, nbytes * 8 // bits, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., d]`` -> codes uint8 ``[..., d]`` (unpacked, 0 .. 2^b - 1) and fp16 scales ``[..., d / group]``
    (the symmetric mid-rise codec of the module docstring)."""
    *lead, d = x.shape
    xg = x.float().reshape(*lead, d // group, group)
    half = 1 << (bits - 1)
    scale = (xg.abs().amax(-1) / (half - 0.5)).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor(xg / scale.float()[..., None]).clamp_(-half, half - 1) + half
    return q.to(torch.uint8).reshape(*lead, d), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    *lead, d = q.shape
    levels = q.float().reshape(*lead, d // group, group) - ((1 << (bits - 1)) - 0.5)
    return (levels * scale.float()[..., None]).reshape(*lead, d)


class DeltaPages:
    """One layer's stored deltas, block-major: packed codes and scales (or fp32 values at 0 bits)."""

    def __init__(self, num_blocks: int, block_size: int, hidden: int, bits: int, group: int, device):
        self.bits, self.group, self.hidden = bits, group, hidden
        self.rotation = hadamard_matrix(group, torch.float32, device)
        self.weight = torch.ones(hidden, device=device)  # per-channel importance (set at bind)
        shape = (num_blocks, block_size)
        if bits:
            self.tensors = (torch.zeros(*shape, hidden * bits // 8, dtype=torch.uint8, device=device),
                            torch.ones(*shape, hidden // group, dtype=torch.float16, device=device))
        else:
            self.tensors = (torch.zeros(*shape, hidden, dtype=torch.float32, device=device),)

    def write(self, slots: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Store ``d [T, hidden]`` at flat ``slots``; returns what a read will give back (fp32)."""
        if not self.bits:
            stored = (d.float(),)
            out = stored[0]
        else:
            q, scale = quantize(self._rotate(d * self.weight), self.bits, self.group)
            stored = (pack_bits(q, self.bits), scale)
            out = self._rotate(dequantize(q, scale, self.bits, self.group)) / self.weight
        for dst, src in zip(self.tensors, stored):
            dst.view(-1, dst.shape[-1]).index_copy_(0, slots, src)
        return out

    def read(self, table: torch.Tensor) -> torch.Tensor:
        """The blocks of ``table`` (any shape) as fp32 ``[numel(table) * block_size, hidden]``."""
        flat = table.reshape(-1)
        parts = [torch.index_select(t, 0, flat).reshape(-1, t.shape[-1]) for t in self.tensors]
        if not self.bits:
            return parts[0]
        codes = unpack_bits(parts[0], self.bits)
        return self._rotate(dequantize(codes, parts[1], self.bits, self.group)) / self.weight

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The block Hadamard rotation (its own inverse: ``H`` is symmetric and orthonormal)."""
        return (x.float().reshape(-1, self.hidden // self.group, self.group) @ self.rotation).reshape(x.shape)
