"""DFloat11: lossless compression of bf16 weights by entropy-coding the exponents.

Paper: "70% Size, 100% Accuracy: Lossless LLM Compression for Efficient GPU
Inference via Dynamic-Length Float" (DFloat11, Zhang et al. 2025).

A bf16 value is ``sign(1) | exponent(8) | mantissa(7)``. Its exponent
``e = (u >> 7) & 0xFF`` carries ~2.6 bits of entropy in trained weights, so:

- ``e`` is Huffman-coded (``dfloat11_huffman``; longest code <= 32 bits, the
  rarest frequencies flattened and the code rebuilt if exceeded); the codes are
  concatenated into one MSB-first bitstream (followed by 8 zero bytes of
  padding, so a decoder can always read 5 bytes at any code start);
- the byte ``sm = (sign << 7) | mantissa`` is stored raw, one per weight;
- rebuild: ``u = (sm & 0x80) << 8 | e << 7 | (sm & 0x7F)``.

Parallel-decode metadata (as in DFloat11's GPU kernel): the stream is cut into
thread windows of ``WINDOW_BITS = 64`` bits; ``window_offsets[w]`` (uint8) is
the bit offset, inside window w, of the first code that starts in it (64 if
none does: only possible right after the stream's last code). A decoder thread
decodes every code that starts inside its window (codes may run into the next
window). Windows are grouped ``WINDOWS_PER_BLOCK = 256`` to a block, and
``block_starts[b]`` (int64) is the index of the first output of block b; a
thread's output index is its block's start plus the exclusive prefix sum of
the code counts of the windows before it in the block.

Decoding reads 32 bits at the code start and walks the hierarchical 256-entry
lookup tables (one byte per level, <= 4 levels); the symbol's code length
advances the bit position. ``decode_stream`` is the vectorised numpy CPU
decoder: it steps all windows together (one code per window per step, active
windows compacted as they finish) and scatters by the block metadata. The
triton kernel (``dfloat11_triton.dfloat11_decode``) is the same per-window
decoder with one lane per window and ``tl.cumsum`` for the in-block prefix.

"One code per transformer block": ``encode_block(dict of bf16 tensors)`` builds
one Huffman table over all the block's exponents and one stream (tensors in
the given order); ``decode_block`` returns the same dict, bit-identical. The
``dfloat11`` WeightFormat codes a single tensor with its own table. It only
accepts bf16 weights (the format is lossless for bf16; casting fp32 weights to
bf16 first is a lossy choice the caller makes explicitly); ``linear`` decodes
the weight and runs ``F.linear`` in the activations' dtype, so a bf16 model's
logits are bit-identical to the uncompressed one. Expected size: ~11/16 of
bf16 (tests report the ratio on SmolLM2).

CPU speed: there is no fast CPU matmul (``cpu_fast.CPU_FAST_PATHS`` has no
entry): every call decodes the whole Huffman stream with the numpy decoder,
measured 25-190 ms per SmolLM2-sized weight (576x576 .. 1536x576) on the
loaded 2-core dev machine, 150-800x an fp32 linear (benchmarks/kernels.py).
On CPU the format is for weights at rest and in transit (expert hosts), to be
decoded once into bf16 before they run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import PackedWeight, WeightFormat, register_format
from tierserve.kernels.quant.dfloat11_huffman import build_luts, canonical_codes, code_lengths

WINDOW_BITS = 64
WINDOWS_PER_BLOCK = 256
STREAM_PADDING_BYTES = 8
_ENCODE_CHUNK = 1 << 20  # elements per bit-expansion chunk (bounds encoder memory)


@dataclass
class DF11Stream:
    """One Huffman-coded exponent stream and its raw sign/mantissa bytes (all CPU or all on one device)."""

    bitstream: torch.Tensor       # uint8, MSB-first codes + STREAM_PADDING_BYTES zeros
    sign_mantissa: torch.Tensor   # uint8 [numel]
    window_offsets: torch.Tensor  # uint8 [n_windows]
    block_starts: torch.Tensor    # int64 [n_blocks]
    luts: torch.Tensor            # int16 [n_tables, 256]
    code_lengths: torch.Tensor    # uint8 [256]
    total_bits: int
    numel: int

    TENSOR_KEYS = ("bitstream", "sign_mantissa", "window_offsets", "block_starts", "luts", "code_lengths")

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.TENSOR_KEYS)


@dataclass
class DF11Block:
    """Every weight of one transformer block coded with one shared table: names, shapes, element offsets."""

    stream: DF11Stream
    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]

    @property
    def nbytes(self) -> int:
        return self.stream.nbytes


def _split_bf16(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    u = w.detach().contiguous().view(torch.int16).cpu().numpy().view(np.uint16).reshape(-1)
    exponent = ((u >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((u >> 8) & 0x80) | (u & 0x7F)).astype(np.uint8)
    return exponent, sign_mantissa


def _write_bits(lengths: np.ndarray, codes: np.ndarray, total_bits: int) -> np.ndarray:
    """MSB-first concatenation of ``codes[i]`` (``lengths[i]`` bits each), packed to bytes."""
    bits = np.zeros(total_bits, dtype=np.uint8)
    pos = 0
    for lo in range(0, len(lengths), _ENCODE_CHUNK):
        ln = lengths[lo:lo + _ENCODE_CHUNK].astype(np.int64)
        cd = codes[lo:lo + _ENCODE_CHUNK]
        n_bits = int(ln.sum())
        starts = np.cumsum(ln) - ln
        within = np.arange(n_bits, dtype=np.int64) - np.repeat(starts, ln)
        shift = (np.repeat(ln, ln) - 1 - within).astype(np.uint64)
        bits[pos:pos + n_bits] = (np.repeat(cd, ln) >> shift) & np.uint64(1)
        pos += n_bits
    return np.packbits(bits)


def encode_exponents(exponent: np.ndarray, sign_mantissa: np.ndarray) -> DF11Stream:
    lengths = code_lengths(np.bincount(exponent, minlength=256))
    codes = canonical_codes(lengths)
    per_len = lengths[exponent].astype(np.int64)
    ends = np.cumsum(per_len)
    starts = ends - per_len
    total_bits = int(ends[-1]) if len(ends) else 0
    packed = _write_bits(per_len, codes[exponent], total_bits)
    stream = np.concatenate([packed, np.zeros(STREAM_PADDING_BYTES, dtype=np.uint8)])
    n_windows = -(-total_bits // WINDOW_BITS)
    window_lo = np.arange(n_windows, dtype=np.int64) * WINDOW_BITS
    first = np.searchsorted(starts, window_lo)
    offsets = np.full(n_windows, WINDOW_BITS, dtype=np.int64)
    has = first < len(starts)
    offsets[has] = np.minimum(starts[first[has]] - window_lo[has], WINDOW_BITS)
    block_starts = np.ascontiguousarray(first[::WINDOWS_PER_BLOCK])
    return DF11Stream(
        bitstream=torch.from_numpy(stream), sign_mantissa=torch.from_numpy(sign_mantissa.copy()),
        window_offsets=torch.from_numpy(offsets.astype(np.uint8)), block_starts=torch.from_numpy(block_starts),
        luts=torch.from_numpy(build_luts(lengths, codes)), code_lengths=torch.from_numpy(lengths),
        total_bits=total_bits, numel=int(exponent.size))


def _check_bf16(name: str, w: torch.Tensor) -> None:
    if w.dtype != torch.bfloat16:
        raise InvalidParameterError(
            name, f"dfloat11 is lossless for bfloat16 weights only, got {w.dtype}; cast explicitly with "
                  f".to(torch.bfloat16) if that (lossy) rounding is intended")
    if w.numel() == 0:
        raise InvalidParameterError(name, "dfloat11 cannot code an empty tensor")


def encode_tensor(w: torch.Tensor, name: str = "weight") -> DF11Stream:
    _check_bf16(name, w)
    return encode_exponents(*_split_bf16(w))


def encode_block(tensors: dict[str, torch.Tensor]) -> DF11Block:
    """One Huffman table and one stream over all tensors of a block (in dict order)."""
    if not tensors:
        raise InvalidParameterError("tensors", "encode_block needs at least one tensor")
    exps, sms, offsets, total = [], [], [], 0
    for name, w in tensors.items():
        _check_bf16(name, w)
        e, sm = _split_bf16(w)
        exps.append(e)
        sms.append(sm)
        offsets.append(total)
        total += e.size
    stream = encode_exponents(np.concatenate(exps), np.concatenate(sms))
    return DF11Block(stream, list(tensors), [tuple(w.shape) for w in tensors.values()], offsets)


def _read32(stream: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The 32 bits starting at bit ``pos`` (MSB-first), as uint64."""
    byte = pos >> 3
    word = np.zeros(len(pos), dtype=np.uint64)
    for i in range(5):
        word = (word << np.uint64(8)) | stream[byte + i].astype(np.uint64)
    return (word >> (np.uint64(8) - (pos & 7).astype(np.uint64))) & np.uint64(0xFFFFFFFF)


def _lookup(luts: np.ndarray, word: np.ndarray) -> np.ndarray:
    """Walk the hierarchical tables: symbol of the code at the top of each 32-bit word."""
    entry = luts[0][(word >> np.uint64(24)).astype(np.int64)].astype(np.int64)
    for level in range(1, 4):
        deeper = np.flatnonzero(entry < 0)
        if deeper.size == 0:
            break
        byte = ((word[deeper] >> np.uint64(24 - 8 * level)) & np.uint64(0xFF)).astype(np.int64)
        entry[deeper] = luts[-entry[deeper], byte]
    return entry


def decode_exponents(s: DF11Stream) -> np.ndarray:
    """Vectorised CPU decoder: uint8 exponents [numel] from the stream and its window/block metadata."""
    stream, luts = s.bitstream.cpu().numpy(), s.luts.cpu().numpy()
    lengths = s.code_lengths.cpu().numpy().astype(np.int64)
    offsets = s.window_offsets.cpu().numpy().astype(np.int64)
    n_windows = len(offsets)
    window_lo = np.arange(n_windows, dtype=np.int64) * WINDOW_BITS
    window_end = np.minimum(window_lo + WINDOW_BITS, s.total_bits)
    symbols = np.zeros((n_windows, WINDOW_BITS), dtype=np.uint8)
    counts = np.zeros(n_windows, dtype=np.int64)
    active = np.flatnonzero(window_lo + offsets < window_end)
    pos = window_lo[active] + offsets[active]
    step = 0
    while active.size:
        sym = _lookup(luts, _read32(stream, pos))
        symbols[active, step] = sym
        counts[active] += 1
        pos = pos + lengths[sym]
        keep = pos < window_end[active]
        active, pos = active[keep], pos[keep]
        step += 1
    # output index of each window: its block's start + exclusive prefix of counts inside the block
    before = np.cumsum(counts) - counts
    block = np.arange(n_windows) // WINDOWS_PER_BLOCK
    first_in_block = before[block * WINDOWS_PER_BLOCK]
    out_start = s.block_starts.cpu().numpy()[block] + before - first_in_block
    out = np.empty(s.numel, dtype=np.uint8)
    cols = np.arange(WINDOW_BITS)
    valid = cols[None, :] < counts[:, None]
    out[(out_start[:, None] + cols[None, :])[valid]] = symbols[valid]
    return out


def assemble_bf16(exponent: np.ndarray | torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
    """bf16 bits ``(sm & 0x80) << 8 | e << 7 | (sm & 0x7F)`` as a flat bfloat16 tensor."""
    e = torch.as_tensor(exponent).to(torch.int32)
    sm = sign_mantissa.to(torch.int32)
    u = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    return torch.where(u >= 32768, u - 65536, u).to(torch.int16).view(torch.bfloat16)


def decode_stream(s: DF11Stream) -> torch.Tensor:
    """Flat bf16 tensor [numel], bit-identical to what was encoded (CUDA: triton kernel)."""
    if s.bitstream.device.type == "cuda":
        from tierserve.kernels.quant.dfloat11_triton import dfloat11_decode

        return dfloat11_decode(s)
    return assemble_bf16(torch.from_numpy(decode_exponents(s)), s.sign_mantissa)


def decode_block(block: DF11Block) -> dict[str, torch.Tensor]:
    flat = decode_stream(block.stream)
    return {name: flat[off:off + int(np.prod(shape))].view(shape)
            for name, shape, off in zip(block.names, block.shapes, block.offsets)}


def stream_to_packed(s: DF11Stream, shape: tuple[int, int], fmt_name: str) -> PackedWeight:
    tensors = {k: getattr(s, k) for k in DF11Stream.TENSOR_KEYS}
    return PackedWeight(fmt_name, shape, tensors, {"total_bits": s.total_bits, "numel": s.numel})


def packed_to_stream(p: PackedWeight) -> DF11Stream:
    return DF11Stream(**{k: p.tensors[k] for k in DF11Stream.TENSOR_KEYS},
                      total_bits=int(p.meta["total_bits"]), numel=int(p.meta["numel"]))


@register_format
class DFloat11Format(WeightFormat):
    """Lossless bf16 weights: Huffman-coded exponents (one table per tensor), raw sign+mantissa bytes."""

    name = "dfloat11"

    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight") -> PackedWeight:
        self.check_shape(tensor_name, tuple(weight.shape))
        return stream_to_packed(encode_tensor(weight, tensor_name), tuple(weight.shape), self.name)

    def dequantize(self, packed: PackedWeight) -> torch.Tensor:
        return decode_stream(packed_to_stream(packed)).view(packed.shape)

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize(packed).to(x.dtype), bias)
