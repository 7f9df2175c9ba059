"""Which CPU fast path each weight format uses, and the transform that swaps them into a model.

``CPU_FAST_PATHS`` maps a format name to a builder ``(QuantizedLinear) ->
nn.Module | None`` (None: no fast path for these options; the module keeps
the torch reference path, which stays the oracle the fast paths are tested
against):

| format   | CPU path                                              | resident bytes / weight |
|----------|-------------------------------------------------------|-------------------------|
| q4_0     | int4_cpu (torch int4 pack, bf16 compute)              | 5.0 bits (ggml: 4.5)    |
| q4_1     | q8_dot (GGUF blocks, int8 activations, integer dots)  | 5.0 bits (unchanged)    |
|          | where it builds, else int4_cpu                        | 5.0 bits                |
| sinq     | int4_cpu when bits = 4 and tile in {32,64,128,256}    | 4.5 bits at tile 64     |
| q8_0     | q8_dot where it builds, else int4_cpu, two terms      | 8.5 bits (unchanged);   |
|          | (q = 16 hi + lo)                                      | int4: 10 bits           |
| mxfp4    | fp4_cpu LUT row chunks (float32, bytes unchanged)     | 4.25 bits (unchanged)   |
| nvfp4    | fp4_cpu LUT row chunks (float32, bytes unchanged)     | 4.5 bits (unchanged)    |
| offq     | offq_cpu (int4 pack, per-token int4 codes)           | 4 bits + bf16 s/z       |
| dfloat11 | none: the Huffman decode dominates (see benchmarks)   | unchanged               |

Paths with bf16 compute round activations and outputs to bf16 (relative
error ~2^-8 of the output scale); float32 paths equal the reference up to
summation order. The integer-dot path (q8_dot_linear.py, kernel
q8_dot_cpu.py) rounds activations to 8 bits per block of 32 instead, as
llama.cpp does (error at most ``dx / 2`` per activation element), and is
faster than the int4 kernel at every row count measured (AVX2 host, one
thread, 3072x576: 1.8x at M=1, 1.3x at M=32, 1.1x at M=512; a Q8_0 49152x576
head 4.2x; benchmarks/q8_dot.py); it holds the file's own blocks, so a tied
Q8_0 head shares the embedding's bytes. Without it (no compiler), Q8_0 trades
some memory for speed: its int4 form takes 10
bits per weight against ggml's 8.5 because the int4 kernels are 5-7x faster
than decoding the native bytes in row chunks (one thread, 1536x576, M=1:
0.068 ms against 0.38 ms; fp32 F.linear 0.052 ms). A Q8_0 tied LM head
thereby gets its own int4 copy next to the embedding's blocks (SmolLM2's
49152x576 head: +35 MB; one thread, M=1: 2.1 ms against 12.4 ms chunked,
7.5 ms fp32 and 106 ms for the reference). MXFP4 does not: its int4-pair
form (``fp4_cpu.MXFP4Int4Linear``, 0.070 ms) needs 9 bits per weight, more
than twice the format's 4.25, and a format chosen to fit a model in less
memory must not double it at load; it decodes its own bytes in row chunks
(0.48 ms). The no-copy alternative of Q8_0 stays available
(``dequant_cpu.Q8_0ChunkedLinear``), as does ``MXFP4Int4Linear``: switching
a format over is one entry in ``CPU_FAST_PATHS``. Without torch's int4 ops
Q8_0 falls back to the chunked path and the other int4 formats to the
reference.

``accelerate_quantized(model)`` replaces every CPU ``QuantizedLinear`` that
has a fast path, under every name it is registered (a module shared by two
names is converted once); the engine calls it through
``cpu_linear.pack_linears`` (linear backends "onednn" and "auto"), while the
"torch" backend keeps the reference.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from tierserve.kernels.quant.base import QuantizedLinear, swap_quantized_linears
from tierserve.kernels.quant.dequant_cpu import Q8_0ChunkedLinear
from tierserve.kernels.quant.fp4_cpu import FP4LutLinear
from tierserve.kernels.quant.int4_cpu import (int4_available, int4_from_q4_0, int4_from_q4_1, int4_from_q8_0,
                                              int4_from_sinq, sinq_int4_supported)
from tierserve.kernels.quant.offq_cpu import offq_cpu_module
from tierserve.kernels.quant.q8_dot_cpu import available as q8_dot_available
from tierserve.kernels.quant.q8_dot_linear import Q8DotLinear

FastBuilder = Callable[[QuantizedLinear], nn.Module | None]


def _int4(convert) -> FastBuilder:
    return lambda q: convert(q.packed(), q.bias) if int4_available() else None


def _sinq(q: QuantizedLinear) -> nn.Module | None:
    p = q.packed()
    return int4_from_sinq(p, q.bias) if int4_available() and sinq_int4_supported(p) else None


def _q8_0(q: QuantizedLinear) -> nn.Module:
    if q8_dot_available():
        return Q8DotLinear("q8_0", q.packed(), q.bias)
    return int4_from_q8_0(q.packed(), q.bias) if int4_available() else Q8_0ChunkedLinear(q.packed(), q.bias)


def _q4_1(q: QuantizedLinear) -> nn.Module | None:
    if q8_dot_available():
        return Q8DotLinear("q4_1", q.packed(), q.bias)
    return int4_from_q4_1(q.packed(), q.bias) if int4_available() else None


CPU_FAST_PATHS: dict[str, FastBuilder] = {
    "q4_0": _int4(int4_from_q4_0),
    "q4_1": _q4_1,
    "sinq": _sinq,
    "q8_0": _q8_0,
    "mxfp4": lambda q: FP4LutLinear(q.fmt, q.packed(), q.bias),
    "nvfp4": lambda q: FP4LutLinear(q.fmt, q.packed(), q.bias),
    "offq": offq_cpu_module,
}


def cpu_fast_module(q: QuantizedLinear) -> nn.Module | None:
    """The fast CPU module for ``q`` (None if its format/options have none or it is not on CPU)."""
    builder = CPU_FAST_PATHS.get(q.fmt.name)
    if builder is None or any(b.device.type != "cpu" for b in q.buffers()):
        return None
    return builder(q)


def accelerate_quantized(model: nn.Module) -> int:
    """Swap every CPU QuantizedLinear with a fast path for it; returns how many modules were converted."""
    return swap_quantized_linears(model, cpu_fast_module)
