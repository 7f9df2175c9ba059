"""Tile configurations of the packed-weight matmul kernels, chosen per M and per weight shape (N, K).

Every fused dequantize-matmul kernel (``q4_0_triton``, ``q4_1_triton``,
``q8_0_triton``, ``sinq_triton``, ``fp4_triton``) computes ``y[M, N] = x[M, K]
W[N, K]^T`` with one program per (BLOCK_M rows, BLOCK_N output features,
K slab) and takes the :class:`TileConfig` fields as ``tl.constexpr``
parameters. The rule (``choose_tiles``), with ``P = TARGET_WAVES * num_sms``
the number of programs we want in flight:

* **M = 1 (decode, GEMV).** ``BLOCK_M = 1, BLOCK_N = 32, BLOCK_K = 256``, no
  ``tl.dot``: each program streams a contiguous slab of packed bytes (32 rows x
  ``K / split_k`` columns), dequantizes in registers and reduces
  ``x[k] * w[n, k]`` with fp32 multiply-adds. The work is memory-bound (one
  weight byte feeds two multiply-adds), so the grid must cover the GPU:
  ``split_k`` doubles (up to ``MAX_SPLIT_SMALL = 16``, and no further than one
  BLOCK_K step per split) until ``cdiv(N, 32) * split_k >= P``.
* **2 <= M <= 16 (small batches).** Same weight streaming (``BLOCK_N = 32``,
  ``BLOCK_K = 128``, split-K to ``P`` programs, cap 16), but the inner product
  is a ``tl.dot`` with ``BLOCK_M = 16`` (tensor cores; rows past M masked).
* **M > 16 (prefill).** Tiled ``tl.dot``: ``BLOCK_M = 32`` for M <= 32 else
  64, ``BLOCK_N = 64``, ``BLOCK_K = 64``; split-K only to fill the GPU, capped
  at ``MAX_SPLIT_LARGE = 4`` because each split writes an fp32 ``M x N``
  partial.

With ``split_k > 1`` each program writes its fp32 partial sum and a second
kernel (``packed_launch.splitk_reduce``) adds the partials in a fixed order,
adds the bias and casts: results are deterministic (no atomics).
``TARGET_WAVES = 2``; ``num_sms`` is the device's multiprocessor count
(``DEFAULT_NUM_SMS = 132``, an H100/H200, where no device is given, e.g.
under the triton interpreter). Pure Python (no torch); tests check the table
with exact assertions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tierserve.errors import InvalidParameterError

TARGET_WAVES = 2
DEFAULT_NUM_SMS = 132
MAX_SPLIT_SMALL = 16
MAX_SPLIT_LARGE = 4
MAX_M = 1 << 20


@dataclass(frozen=True)
class TileConfig:
    """Block sizes, split-K factor and launch options of one packed matmul launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool
    num_warps: int
    num_stages: int

    def k_per_split(self, k: int) -> int:
        """Columns of K per split, a whole number of BLOCK_K steps."""
        steps = -(-k // self.block_k)
        return -(-steps // self.split_k) * self.block_k

    def grid(self, m: int, n: int, k: int) -> tuple[int, int, int]:
        """(row tiles, column tiles, K splits actually used)."""
        return -(-m // self.block_m), -(-n // self.block_n), -(-k // self.k_per_split(k))


def _split(tiles: int, k: int, block_k: int, cap: int, num_sms: int) -> int:
    steps = -(-k // block_k)
    split = 1
    while tiles * split < TARGET_WAVES * num_sms and split * 2 <= min(cap, steps):
        split *= 2
    return split


@lru_cache(maxsize=4096)
def choose_tiles(m: int, n: int, k: int, num_sms: int = DEFAULT_NUM_SMS) -> TileConfig:
    """The tile configuration for an ``[m, k] x [n, k]^T`` packed matmul (rule: module docstring)."""
    for field, value, lo in (("m", m, 1), ("n", n, 1), ("k", k, 1), ("num_sms", num_sms, 1)):
        if not isinstance(value, int) or value < lo:
            raise InvalidParameterError(field, f"must be an int >= {lo}, got {value!r}")
    if m > MAX_M:
        raise InvalidParameterError("m", f"must be <= {MAX_M}, got {m}")
    if m == 1:
        bm, bn, bk, cap, dot, warps, stages = 1, 32, 256, MAX_SPLIT_SMALL, False, 4, 2
    elif m <= 16:
        bm, bn, bk, cap, dot, warps, stages = 16, 32, 128, MAX_SPLIT_SMALL, True, 4, 3
    else:
        bm, bn, bk, cap, dot, warps, stages = (32 if m <= 32 else 64), 64, 64, MAX_SPLIT_LARGE, True, 4, 3
    tiles = -(-m // bm) * -(-n // bn)
    return TileConfig(bm, bn, bk, _split(tiles, k, bk, cap, num_sms), dot, warps, stages)
