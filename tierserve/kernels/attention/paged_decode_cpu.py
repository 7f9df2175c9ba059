"""Decode attention over plain fp32 KV pages on the CPU, reading the pages in place (C++ kernel).

The torch reference (kernels/paged_attention.py, decode-only steps) gathers
every sequence's pages into a padded ``[B, Hkv, W, D]`` copy of K and of V per
layer (two ``index_select``), builds a ``[B, W]`` key mask and runs one masked
SDPA. This kernel (paged_decode_cpu.cpp) does the same attention without
the copies. One layer of SmolLM2's shape (9 query heads, 3 KV heads, D 64),
two threads on the 2-core AVX2 host, per call: batch 1 at context 96 151 us
(torch) against 32 us; batch 8 360 vs 140 us; batch 32 1546 vs 505 us; batch
32 at context 1024 14.7 vs 12.3 ms (there both read the same bytes).

The kernel reads each key and value row where the pages hold it. Per
(sequence b, KV head h), over the keys ``j`` in ``[lo, L)`` (``L`` the
context length, ``lo = max(0, L - window)`` with a sliding window, else 0),
for each of the ``G = Hq / Hkv`` query heads of h:

    s_j = scale * q . k_j      (then cap * tanh(s_j / cap) with soft-capping)
    p_j = exp(s_j - max s),    out = sum_j p_j v_j / sum_j p_j

in three passes over a per-thread score buffer (scores, then their
exponentials and sum, then the weighted sum of the value rows, each row read
once for the G heads). The (b, h) tasks are split over torch's intra-op
threads; dot products and weighted sums run 8 float lanes at a time (AVX2,
``D`` a multiple of 16 / 8), else scalar. It agrees with the reference within
float32 rounding (max abs difference ~1e-6 on unit-scale inputs, tested):
the order of the sums differs, nothing else.

``applies(q, kv)`` says when it replaces the reference: CPU tensors, float32
queries and pages (``LayerKV``; packed formats dequantize in their own
gather), not while torch.compile traces, and the extension built
(kernels/cpu_extension.py).
"""

from __future__ import annotations

import functools
import os

import torch

from tierserve.kernels.cpu_extension import load_cpu_extension


@functools.cache
def _extension():
    return load_cpu_extension("tierserve_paged_decode",
                              os.path.join(os.path.dirname(__file__), "paged_decode_cpu.cpp"),
                              "paged decode attention CPU kernel")


def kernel_available() -> bool:
    """Whether the C++ kernel is built (compiling it on the first call)."""
    return _extension() is not None


def applies(q: torch.Tensor, kv) -> bool:
    """Whether ``paged_decode`` serves this decode step (module doc)."""
    k = getattr(kv, "k", None)
    return (q.device.type == "cpu" and q.dtype == torch.float32 and isinstance(k, torch.Tensor)
            and k.dtype == torch.float32 and getattr(kv, "gather", None) is None
            and not torch.compiler.is_compiling() and kernel_available())


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                 logit_softcap: float | None = None) -> torch.Tensor:
    """``q [B, Hq, D]`` against pages ``[NB, BS, Hkv, D]`` through ``table [B, W]`` (int64) for contexts
    ``seq_lens [B]`` (int32): ``[B, Hq, D]`` float32 (module doc)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0, got {logit_softcap}")
    return _extension().paged_decode(q.contiguous(), k_pages, v_pages, table, seq_lens, float(scale),
                                     sliding_window or 0, float(logit_softcap or 0.0))
