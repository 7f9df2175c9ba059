"""Length-limited canonical Huffman codes over byte symbols, and their hierarchical lookup tables.

Used by DFloat11 (``dfloat11.py``) to code the 8-bit exponents of bf16 weights.

- ``code_lengths(freqs, max_len=32)``: Huffman code lengths from a 256-entry
  histogram (heap merge, ties broken by creation order so the result is
  deterministic). If the longest code exceeds ``max_len`` the rarest
  frequencies are flattened -- every nonzero count below a floor is raised to
  the floor, the floor doubling from twice the smallest count -- and the code is
  rebuilt; equal counts give a balanced tree of depth <= 8, so this ends. A
  single present symbol gets a 1-bit code.
- ``canonical_codes(lengths)``: canonical code values (symbols sorted by
  (length, symbol); code = (previous code + 1) << (length increase)).
- ``build_luts(lengths, codes)``: hierarchical 256-entry tables, read MSB-first
  one byte at a time. Table 0 is indexed by the first byte of the bit window.
  An entry ``e >= 0`` is the decoded symbol (its length is ``lengths[e]``); an
  entry ``e < 0`` sends the next byte to table ``-e``. A code of length L <= 8
  fills the ``2^(8-L)`` entries it prefixes; a longer code fills a chain of
  tables, one per byte. Codes of length <= 32 need at most 4 levels.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_LEN = 32
LUT_LEVELS = 4


def _huffman_lengths(freqs: np.ndarray) -> np.ndarray:
    lengths = np.zeros(256, dtype=np.int64)
    present = [int(s) for s in np.flatnonzero(freqs)]
    if len(present) == 1:
        lengths[present[0]] = 1
        return lengths
    heap = [(int(freqs[s]), i, [s]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:  # every symbol under the merged node sinks one level
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, order, s1 + s2))
        order += 1
    return lengths


def code_lengths(freqs: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Huffman code lengths (uint8 [256]) with the longest <= max_len (see module docstring)."""
    f = np.asarray(freqs, dtype=np.int64).copy()
    if f.shape != (256,) or f.min() < 0 or f.sum() == 0:
        raise ValueError("code_lengths needs 256 non-negative counts, not all zero")
    floor = 2 * int(f[f > 0].min())
    while True:
        lengths = _huffman_lengths(f)
        if lengths.max() <= max_len:
            return lengths.astype(np.uint8)
        f = np.where(f > 0, np.maximum(f, floor), 0)
        floor *= 2


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint64 [256]) for the given lengths (0 = absent symbol)."""
    codes = np.zeros(256, dtype=np.uint64)
    symbols = sorted((int(lengths[s]), s) for s in np.flatnonzero(lengths))
    code, prev_len = 0, symbols[0][0]
    for length, s in symbols:
        code <<= length - prev_len
        codes[s] = code
        code += 1
        prev_len = length
    return codes


def build_luts(lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Hierarchical lookup tables int16 [n_tables, 256] (see module docstring)."""
    tables = [np.zeros(256, dtype=np.int16)]
    children: dict[tuple[int, int], int] = {}  # (table, byte) -> child table
    for s in np.flatnonzero(lengths):
        length, code = int(lengths[s]), int(codes[s])
        table, consumed = 0, 0
        while length - consumed > 8:
            byte = (code >> (length - consumed - 8)) & 0xFF
            if (table, byte) not in children:
                children[(table, byte)] = len(tables)
                tables.append(np.zeros(256, dtype=np.int16))
                tables[table][byte] = -children[(table, byte)]
            table = children[(table, byte)]
            consumed += 8
        rest = length - consumed
        first = (code & ((1 << rest) - 1)) << (8 - rest)
        tables[table][first:first + (1 << (8 - rest))] = s
    return np.stack(tables)
