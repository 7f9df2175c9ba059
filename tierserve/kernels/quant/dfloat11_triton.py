"""Triton parallel decoder for DFloat11 streams (see ``dfloat11.py`` for the format).

One program per block of ``WINDOWS_PER_BLOCK`` thread windows, one lane per
64-bit window. Each lane starts at its window's first code
(``window_offsets``), reads 32 bits (5 byte loads), walks the hierarchical
256-entry lookup tables (<= 4 levels, ``tl.where`` between levels) and
advances by the symbol's code length, for at most 64 steps (a window holds at
most 64 code starts), masked once the position leaves the window. Pass 1
counts the codes per lane; ``tl.cumsum`` gives each lane's exclusive prefix,
added to ``block_starts[block]``; pass 2 decodes again and writes
``(sm & 0x80) << 8 | e << 7 | (sm & 0x7F)`` as int16 (viewed as bf16).
Same semantics as the CPU decoder ``dfloat11.decode_stream``; tests compare
the two (``torch.equal``) under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierserve.kernels.quant.dfloat11 import WINDOW_BITS, WINDOWS_PER_BLOCK, DF11Stream


@triton.jit
def _decode_symbol(stream_ptr, luts_ptr, pos, active):
    byte = pos >> 3
    word = tl.zeros(pos.shape, dtype=tl.int64)
    for i in tl.static_range(5):
        b = tl.load(stream_ptr + byte + i, mask=active, other=0).to(tl.int64)
        word = (word << 8) | b
    word = (word >> (8 - (pos & 7))) & 0xFFFFFFFF
    entry = tl.load(luts_ptr + (word >> 24), mask=active, other=0).to(tl.int32)
    for level in tl.static_range(1, 4):
        deeper = active & (entry < 0)
        idx = (-entry).to(tl.int64) * 256 + ((word >> (24 - 8 * level)) & 0xFF)
        nxt = tl.load(luts_ptr + idx, mask=deeper, other=0).to(tl.int32)
        entry = tl.where(deeper, nxt, entry)
    return entry


@triton.jit
def _dfloat11_decode_kernel(stream_ptr, sm_ptr, offsets_ptr, block_starts_ptr, luts_ptr, lengths_ptr, out_ptr,
                            n_windows, total_bits, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    w = b * BLOCK + tl.arange(0, BLOCK)
    in_range = w < n_windows
    lo = w.to(tl.int64) * WINDOW
    end = tl.minimum(lo + WINDOW, total_bits)
    start = lo + tl.load(offsets_ptr + w, mask=in_range, other=WINDOW).to(tl.int64)
    pos = start
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    for _ in range(WINDOW):
        active = in_range & (pos < end)
        sym = _decode_symbol(stream_ptr, luts_ptr, pos, active)
        length = tl.load(lengths_ptr + sym, mask=active, other=0).to(tl.int64)
        pos = tl.where(active, pos + length, pos)
        count += active.to(tl.int64)
    out_idx = tl.load(block_starts_ptr + b) + tl.cumsum(count, axis=0) - count
    pos = start
    for _ in range(WINDOW):
        active = in_range & (pos < end)
        sym = _decode_symbol(stream_ptr, luts_ptr, pos, active)
        length = tl.load(lengths_ptr + sym, mask=active, other=0).to(tl.int64)
        sm = tl.load(sm_ptr + out_idx, mask=active, other=0).to(tl.int32)
        u = ((sm & 0x80) << 8) | (sym << 7) | (sm & 0x7F)
        u = tl.where(u >= 32768, u - 65536, u)
        tl.store(out_ptr + out_idx, u.to(tl.int16), mask=active)
        pos = tl.where(active, pos + length, pos)
        out_idx += active.to(tl.int64)


def dfloat11_decode(s: DF11Stream) -> torch.Tensor:
    """Flat bf16 tensor [numel] decoded from a DFloat11 stream (all its tensors on one device)."""
    out = torch.empty(s.numel, dtype=torch.int16, device=s.bitstream.device)
    n_windows = s.window_offsets.numel()
    grid = (triton.cdiv(n_windows, WINDOWS_PER_BLOCK),)
    t = [getattr(s, k).contiguous() for k in DF11Stream.TENSOR_KEYS]
    _dfloat11_decode_kernel[grid](*t, out, n_windows, s.total_bits,
                                  WINDOW=WINDOW_BITS, BLOCK=WINDOWS_PER_BLOCK)
    return out.view(torch.bfloat16)
