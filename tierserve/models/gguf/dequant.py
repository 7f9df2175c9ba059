"""Vectorised numpy dequantisation of ggml tensor blocks to float32.

Each ggml type stores ``block_size`` values in ``type_size`` bytes
(``ggml_types.GGML_TYPES``). A decoder maps a uint8 array of shape
``(n_blocks, type_size)`` to float32 ``(n_blocks, block_size)``; decoders are
picked from the ``DEQUANTIZERS`` registry by type name. fp16 scales are widened
to float32 first and every product/sum is done in float32 in the same order as
ggml's reference C (and gguf-py), so results are bit-exact with those.

Layouts (``d``/``dmin``/``m`` are fp16; ``q`` the unsigned code):
  Q4_0  [d][16 B nibbles]           x = d * (q - 8);  element j<16 low nibble of byte j, j>=16 high nibble of j-16
  Q4_1  [d][m][16 B nibbles]        x = d * q + m
  Q5_0  [d][qh u32][16 B nibbles]   x = d * (q - 16), q = nibble | bit_j(qh) << 4
  Q5_1  [d][m][qh u32][16 B]        x = d * q + m
  Q8_0  [d][32 x int8]              x = d * q
  Q2_K  [16 B scales][64 B q2][d][dmin], 16 groups of 16:  x = (d*(s&15)) * q - dmin*(s>>4)
  Q3_K  [32 B hmask][64 B q2][12 B 6-bit scales][d]:  x = (d*(s-32)) * (q2 - 4*(1-h))
  Q4_K  [d][dmin][12 B 6-bit scale/min x 8][128 B nibbles], 8 groups of 32:  x = (d*sc) * q - dmin*mn
  Q5_K  as Q4_K plus [32 B qh]: q = nibble | bit_group(qh[l]) << 4
  Q6_K  [128 B low nibbles][64 B 2-bit highs][16 x int8 scales][d]:  x = (d*sc) * (q - 32)
  F32 / F16 / BF16: plain element views (BF16 = the high 16 bits of a float32).

``dequantize`` processes at most ``CHUNK_BLOCKS`` (65536) blocks at a time into a
preallocated output, bounding temporaries to a few MiB whatever the tensor
size. Types not in the registry raise UnsupportedTensorTypeError.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tierserve.errors import ModelLoadError, UnsupportedTensorTypeError
from tierserve.models.gguf.ggml_types import GGML_TYPES_BY_NAME

CHUNK_BLOCKS = 65536

BlockDecoder = Callable[[np.ndarray], np.ndarray]


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian fp16."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): low nibbles of all bytes, then high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _bits_u32(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) uint8 bits, bit 0 first."""
    word = np.ascontiguousarray(qh).view("<u4")
    return ((word >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32)


def _f16_elems(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _bf16(raw: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _q4_0(raw: np.ndarray) -> np.ndarray:
    d = _f16(raw[:, :2])
    q = _nibbles(raw[:, 2:]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    d, m = _f16(raw[:, :2]), _f16(raw[:, 2:4])
    return d * _nibbles(raw[:, 4:]).astype(np.float32) + m


def _q5_0(raw: np.ndarray) -> np.ndarray:
    d = _f16(raw[:, :2])
    q = _nibbles(raw[:, 6:]) | (_bits_u32(raw[:, 2:6]) << np.uint8(4))
    return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _q5_1(raw: np.ndarray) -> np.ndarray:
    d, m = _f16(raw[:, :2]), _f16(raw[:, 2:4])
    q = _nibbles(raw[:, 8:]) | (_bits_u32(raw[:, 4:8]) << np.uint8(4))
    return d * q.astype(np.float32) + m


def _q8_0(raw: np.ndarray) -> np.ndarray:
    d = _f16(raw[:, :2])
    return np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(np.float32) * d


def _crumbs(qs: np.ndarray, halves: int) -> np.ndarray:
    """2-bit codes: (n, 32*halves) bytes -> (n, 128*halves), ordered (half, shift 0,2,4,6, byte)."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, halves, 1, 32) >> shifts) & np.uint8(3)).reshape(n, 128 * halves)


def _q2_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    scales, qs = raw[:, :16], raw[:, 16:80]
    d, dmin = _f16(raw[:, 80:82]), _f16(raw[:, 82:84])
    dl = (d * (scales & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _crumbs(qs, 2).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales: low nibbles from bytes 0-7, 2 high bits from 8-11."""
    low = np.concatenate([packed[:, :8] & np.uint8(0x0F), packed[:, :8] >> np.uint8(4)], axis=-1)
    high = np.concatenate([(packed[:, 8:12] >> np.uint8(s)) & np.uint8(3) for s in (0, 2, 4, 6)], axis=-1)
    return ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)


def _q3_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    hmask, qs, packed = raw[:, :32], raw[:, 32:96], raw[:, 96:108]
    d = _f16(raw[:, 108:110])
    dl = (d * _q3_k_scales(packed)).reshape(n, 16, 1)
    low = _crumbs(qs, 2)
    bit = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = ((hmask.reshape(n, 1, 32) >> bit) & np.uint8(1)).reshape(n, 256)
    q = low.astype(np.int8) - ((high ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte field -> 8 six-bit scales and 8 six-bit mins (uint8)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & np.uint8(63), (c & np.uint8(0x0F)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=-1)
    mn = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, mn


def _k_affine(raw: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Apply Q4_K/Q5_K's per-group (d*sc) * q - dmin*mn to codes q of shape (n, 8, 32)."""
    n = raw.shape[0]
    d, dmin = _f16(raw[:, :2]), _f16(raw[:, 2:4])
    sc, mn = _k_scale_min(raw[:, 4:16])
    dl = (d * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.astype(np.float32)).reshape(n, 8, 1)
    return (dl * q.astype(np.float32) - ml).reshape(n, 256)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): chunk c of 32 bytes gives group 2c (low) and 2c+1 (high)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & np.uint8(0x0F)).reshape(n, 8, 32)


def _q4_k(raw: np.ndarray) -> np.ndarray:
    return _k_affine(raw, _k_nibbles(raw[:, 16:144]))


def _q5_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    qh = raw[:, 16:48]
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    return _k_affine(raw, _k_nibbles(raw[:, 48:176]) | (high << np.uint8(4)))


def _q6_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    ql, qh = raw[:, :128], raw[:, 128:192]
    scales = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(raw[:, 208:210])
    dl = (d * scales).reshape(n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    q = low.reshape(n, 256) | (_crumbs(qh, 2) << np.uint8(4))
    q = (q.astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (dl * q).reshape(n, 256)


DEQUANTIZERS: dict[str, BlockDecoder] = {
    "F32": _f32, "F16": _f16_elems, "BF16": _bf16,
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}

SUPPORTED_GGML_TYPES: tuple[str, ...] = tuple(DEQUANTIZERS)


def dequantize(raw: np.ndarray, type_name: str, n_elements: int, tensor_name: str = "<tensor>") -> np.ndarray:
    """Decode ``raw`` (1-D uint8, the tensor's bytes) of ggml type ``type_name`` to float32 (1-D).

    Raises UnsupportedTensorTypeError for a type outside ``SUPPORTED_GGML_TYPES``
    and ModelLoadError when the byte count does not match ``n_elements``.
    """
    decoder = DEQUANTIZERS.get(type_name)
    if decoder is None:
        raise UnsupportedTensorTypeError(tensor_name, type_name, list(SUPPORTED_GGML_TYPES))
    gtype = GGML_TYPES_BY_NAME[type_name]
    n_blocks, rest = divmod(n_elements, gtype.block_size)
    if rest or raw.size != n_blocks * gtype.type_size:
        raise ModelLoadError(
            f"GGUF tensor {tensor_name!r}: {raw.size} bytes of {type_name} cannot hold {n_elements} "
            f"elements (blocks of {gtype.block_size} values in {gtype.type_size} bytes)")
    blocks = raw.reshape(n_blocks, gtype.type_size)
    out = np.empty((n_blocks, gtype.block_size), dtype=np.float32)
    for start in range(0, n_blocks, CHUNK_BLOCKS):
        stop = min(start + CHUNK_BLOCKS, n_blocks)
        out[start:stop] = decoder(blocks[start:stop])
    return out.reshape(n_elements)
