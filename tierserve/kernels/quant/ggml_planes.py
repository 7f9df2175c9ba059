"""ggml blocks split into planes for the GPU kernels: codes, scales (and mins) each contiguous per row.

A ggml row interleaves, per block of 32 weights, its fp16 metadata (Q4_0 /
Q8_0: the scale d; Q4_1: d then the min m) and its code bytes (Q4_0 / Q4_1:
16 bytes, byte j holding weight j in its low nibble and weight j + 16 in its
high nibble; Q8_0: 32 int8). Blocks of 18, 20 or 34 bytes put the code bytes
of consecutive blocks 2 or 4 bytes apart, so a kernel reading them in place
gathers bytes and gets no wide loads. ``split_planes`` copies a weight once,
at load, into

* ``codes``  uint8 ``[N, nb * code_bytes]``: each block's code bytes, blocks
  back to back, in ggml's order within a block (so for the 4-bit formats the
  byte of column pair ``(32 b + j, 32 b + j + 16)`` sits at ``16 b + j``);
* ``scales`` fp16 ``[N, nb]`` (d of block b at column b);
* ``mins``   fp16 ``[N, nb]`` (Q4_1's m) or None;

with nb = K / 32. The bytes are the file's bytes (no re-quantization), the
total size is unchanged, and ``join_planes`` inverts it exactly (tests:
tests/test_gpu_linear.py). A kernel's tile of BLOCK_K columns then reads a
contiguous run of code bytes per row, which the compiler turns into vector
loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass(frozen=True)
class GGMLPlanes:
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None


def split_planes(blocks: torch.Tensor, type_size: int, num_meta: int) -> GGMLPlanes:
    """uint8 ``blocks [N, nb * type_size]`` (``num_meta`` fp16 values first in each block) -> planes."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, type_size)
    meta = b[..., : 2 * num_meta].contiguous().view(torch.float16)  # [N, nb, num_meta]
    codes = b[..., 2 * num_meta:].reshape(n, -1).contiguous()
    return GGMLPlanes(codes, meta[..., 0].contiguous(), meta[..., 1].contiguous() if num_meta > 1 else None)


def join_planes(planes: GGMLPlanes) -> torch.Tensor:
    """The inverse of ``split_planes``: the ggml block bytes ``[N, nb * type_size]``."""
    n, nb = planes.scales.shape
    parts = [planes.scales.reshape(n, nb, 1)]
    if planes.mins is not None:
        parts.append(planes.mins.reshape(n, nb, 1))
    meta = torch.cat(parts, dim=2).contiguous().view(torch.uint8)
    return torch.cat([meta, planes.codes.reshape(n, nb, -1)], dim=2).reshape(n, -1)
