"""The eager CPU decoder's row-wise glue in single C++ calls (decoder_rows_cpu.cpp): RMSNorm, RoPE of q and k
out of the fused QKV projection, and greedy sampling's argmax.

In eager mode each ATen op is a dispatch and a pass over its rows; at one
token a step of SmolLM2-135M is ~30 layers of a few hundred floats, so the
dispatches, not the arithmetic, take the time. Measured per call on the 2-core
AVX2 host:

- ``rms_norm``: ``F.rms_norm`` is a composite of six ATen ops (pow, mean,
  add, rsqrt, mul, mul): ~20 us for one row of 576 floats, ~2 us here (32 rows:
  27 vs 6 us; 2048 rows, a long prefill: 744 vs 236 us). Two per layer and the
  final norm: 61 calls a step.
- ``rope_qk``: the merged RoPE of models/attention.py (slice and reshape q|k,
  ``apply_rope_full``'s mul, roll, mul, add, then q and k made contiguous,
  about a dozen dispatches) in one call that writes q and k contiguous.

- ``argmax_rows``: ``torch.argmax`` over a row of SmolLM2's 49152 logits takes
  ~73 us at one row and ~1.2 ms at 32 rows (two threads, Xeon host; 2.3 ms a
  step inside a batch-32 decode, 5% of it); this kernel's two passes read the
  row at memory speed.

Algorithms:

- RMSNorm, per row of ``D``: ``s = sum x^2`` in float32 over 8 partial sums
  (lane ``j`` takes elements ``j, j + 8, ...``; the lanes then added pairwise,
  the ``D mod 8`` tail last), ``r = 1 / sqrt(s / D + eps)``, ``y = (x r) w``.
  Bound against the formula in float64 on the same inputs: each partial sum
  adds ``D / 8`` rounded squares, three pairwise levels and the tail follow,
  the square root, division and two products add six roundings, so
  ``|y - y64| <= (D / 16 + 8) 2^-23 |y64|`` elementwise (tested). ``F.rms_norm``
  sums in another order: both lie within that bound of ``y64``.
- RoPE, rotate-half layout, per token and head of ``D``: ``out_i = x_i c_i +
  x_{(i + D/2) mod D} s_i`` with the step's widened tables ``c = [cos, cos]``,
  ``s = [-sin, sin]`` (rope.rope_tables): the two products rounded, then their
  sum, as ``apply_rope_full`` rounds them, so q and k are bit-equal to the torch
  path (tested). The source is compiled with ``-ffp-contract=off`` so that the
  compiler never fuses a product and a sum into one FMA (which would round once
  less).
- argmax, per row: pass 1 the maximum (8 lanes under AVX2) and whether a NaN
  occurs, pass 2 the first index equal to the maximum, or the first NaN's: the
  index ``torch.argmax`` returns (the first maximal value, NaN counted as the
  maximum; tested, ties and NaN included). Exact: no arithmetic.

Rows (and, for RoPE, token-heads) are split over torch's intra-op threads in
chunks of at least 16384 elements, so a decode step's rows stay on one thread.
``applies(*tensors)`` says when the callers (``RMSNorm`` in models/layers.py,
``Attention`` in models/attention.py) use these: CPU float32 tensors, no
gradient asked for (the kernels have no backward: with grad enabled and an
input that requires it, the torch forms run), not while torch.compile traces
(inductor fuses the torch forms itself), and the extension built
(kernels/cpu_extension.py; without a compiler the torch forms stay).
"""

from __future__ import annotations

import functools
import os

import torch

from tierserve.kernels.cpu_extension import load_cpu_extension


@functools.cache
def _extension():
    return load_cpu_extension("tierserve_decoder_rows", os.path.join(os.path.dirname(__file__),
                                                                    "decoder_rows_cpu.cpp"),
                              "decoder row-op CPU kernels", extra_cflags=("-ffp-contract=off",))


def kernel_available() -> bool:
    """Whether the C++ kernels are built (compiling them on the first call)."""
    return _extension() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these kernels serve a call on ``tensors`` (module doc)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and kernel_available())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * w`` for float32 ``x [..., D]``, ``w [D]`` (module doc)."""
    return _extension().rms_norm(x, w, eps)


def rope_qk(qkv: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor, num_heads: int,
            num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[T, num_heads, D]`` and k ``[T, num_kv_heads, D]``, contiguous: the first heads of ``qkv [T, W]``
    rotated by the step's widened tables ``[T, 1, D]`` (module doc)."""
    return _extension().rope_qk(qkv, cos_full, sin_signed, num_heads, num_kv_heads)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D ``x``: the kernel where ``applies(x)``, else torch's (module doc)."""
    if x.dim() == 2 and x.shape[1] > 0 and applies(x):
        return _extension().argmax_rows(x)
    return x.argmax(dim=-1)
