"""RMSNorm of float32 rows on the CPU in one C++ call (norm_cpu.cpp).

``F.rms_norm`` on the CPU is a composite of six ATen ops (pow, mean, add,
rsqrt, mul, mul), each a dispatch and a pass over the row: ~20 us for one row of
576 floats on the 2-core AVX2 host, against ~2 us for this kernel (32 rows: 27
vs 6 us; 2048 rows, a long prefill: 744 vs 236 us). A decode step of
SmolLM2-135M calls it 61 times (two per layer and the final norm).

Algorithm, per row of ``D``: ``s = sum x^2`` in float32 over 8 partial sums
(lane ``j`` takes elements ``j, j + 8, ...``; the lanes then added pairwise, the
``D mod 8`` tail last), ``r = 1 / sqrt(s / D + eps)``, ``y = (x r) w``. The
AVX2 and the scalar builds add in the same order and agree bit for bit. Against
``F.rms_norm`` only the order of the sum of squares differs: both are within
float32 rounding of the float64 formula (max abs difference ~1e-6 on unit-scale
rows, tested against float64). Rows are split over torch's intra-op threads in
chunks of at least 16384 elements, so a decode step's rows stay on one thread.

``applies(x, w)`` says when ``RMSNorm`` (models/layers.py) calls it: CPU float32
input and weight, not while torch.compile traces (inductor fuses the
composite itself), and the extension built (kernels/cpu_extension.py; without a
compiler ``F.rms_norm`` stays).
"""

from __future__ import annotations

import functools
import os

import torch

from tierserve.kernels.cpu_extension import load_cpu_extension


@functools.cache
def _extension():
    return load_cpu_extension("tierserve_norm", os.path.join(os.path.dirname(__file__), "norm_cpu.cpp"),
                              "RMSNorm CPU kernel")


def kernel_available() -> bool:
    """Whether the C++ kernel is built (compiling it on the first call)."""
    return _extension() is not None


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``rms_norm`` serves this call (module doc)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and not torch.compiler.is_compiling() and kernel_available())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * w`` for float32 ``x [..., D]``, ``w [D]`` (module doc)."""
    return _extension().rms_norm(x, w, eps)
