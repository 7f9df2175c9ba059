"""CPU linear backend: weights prepacked once into oneDNN's blocked layout.

``y = x W^T + b``, the same operation as the torch reference
``torch.nn.functional.linear``. On CPU, oneDNN's inner-product kernel on a
weight reordered once at load time (``torch.ops.mkldnn._reorder_linear_weight``,
the path torch.compile's CPU backend uses) reads the weight at close to
memory bandwidth: measured on the 2-core dev machine, a 576x3072 fp32 weight
streams at ~37 GB/s at 1-8 rows versus ~16 GB/s for ``F.linear`` (MKL sgemm),
and ~2.3x faster at 128-2048 rows (prefill). Results differ from the
reference only by summation order (tests: relative error <= 1e-5). Under
``torch.compile`` the kernel runs as the opaque op ``tierserve::onednn_linear``.

``pack_linears(model)`` is a transform applied to a built model: it swaps every
``nn.Linear`` (and the tied LM head) for a :class:`PackedLinear` holding only
the packed weight, where oneDNN packs the weight's dtype on this CPU
(``onednn_packs``: bf16 and fp16 need AVX512 or AVX-NE-CONVERT; elsewhere those
layers keep ``F.linear``). It is chosen through ``LINEAR_BACKENDS`` by name; "auto"
packs on CPU when oneDNN is available and leaves other devices untouched.
Both "onednn" and "auto" also swap every CPU ``QuantizedLinear`` for its
format's fast CPU path (``kernels/quant/cpu_fast.py``: torch's int4 kernels
for Q4_0/Q4_1/SINQ/Q8_0, row-chunked decoding of the native bytes for MXFP4/NVFP4); the
"torch" backend keeps every layer on its reference path.

On CUDA the choice is device-driven: "auto" (and "triton") also swap every
``QuantizedLinear`` whose weights live on a CUDA device for its fused triton
kernel module (``gpu_linear.accelerate_cuda``), so a model moved to the GPU
needs no flag; CPU modules are untouched by that step and a model without
CUDA quantized linears never imports triton.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tierserve.errors import InvalidParameterError


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of ``dtype`` on this CPU: its bf16/fp16 paths need AVX512 (BW/VL/DQ) or
    AVX-NE-CONVERT, so an AVX2-only host packs float32 alone (one probe per dtype and process)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), None)
    except RuntimeError:
        return False
    return True


@torch.library.custom_op("tierserve::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x [M, K] @ W^T + b`` on a weight packed by ``_reorder_linear_weight``: the same kernel as the eager
    forward, as an opaque op for ``torch.compile`` (inductor's own lowering of ``_linear_pointwise`` needs
    the weight frozen into the graph as a constant, which would compile every layer apart)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x, packed, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


class PackedLinear(nn.Module):
    """A linear layer whose weight lives in oneDNN's packed layout (CPU only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if torch.compiler.is_compiling():  # models/decode_compile.py
            y = onednn_linear(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
            return y.reshape(*lead, self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                              "none", [], "")
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "TiedLMHead"


def _accelerate_quantized(model: nn.Module) -> int:
    if not any(type(m).__name__ == "QuantizedLinear" for m in model.modules()):
        return 0  # plain models never import the weight formats
    from tierserve.kernels.quant.cpu_fast import accelerate_quantized

    return accelerate_quantized(model)


def pack_linears(model: nn.Module) -> int:
    """Swap every linear of a CPU model for a PackedLinear (quantized ones for their fast CPU path);
    returns how many were swapped."""
    packed: dict[int, PackedLinear] = {}  # a module registered under two names is packed once
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # every name, aliases included
            if (child is not None and _is_linear(child) and child.weight.device.type == "cpu"
                    and onednn_packs(child.weight.dtype)):  # other dtypes keep the reference F.linear
                if id(child) not in packed:
                    packed[id(child)] = PackedLinear(child.weight, child.bias)
                setattr(parent, name, packed[id(child)])
    return len(packed) + _accelerate_quantized(model)


def accelerate_cuda_quantized(model: nn.Module) -> int:
    """Swap every CUDA QuantizedLinear for its triton kernel module; returns how many were swapped."""
    if not any(type(m).__name__ == "QuantizedLinear" and any(b.device.type == "cuda" for b in m.buffers())
               for m in model.modules()):
        return 0  # CPU-only models never import triton
    from tierserve.kernels.gpu_linear import accelerate_cuda

    return accelerate_cuda(model)


def _auto(model: nn.Module) -> int:
    first = next(model.parameters(), None)
    on_cpu = first is not None and first.device.type == "cpu"
    packed = pack_linears(model) if on_cpu and onednn_available() else 0
    return packed + accelerate_cuda_quantized(model)


LINEAR_BACKENDS = {"torch": lambda model: 0, "onednn": pack_linears, "triton": accelerate_cuda_quantized,
                   "auto": _auto}


def apply_linear_backend(model: nn.Module, name: str) -> int:
    try:
        transform = LINEAR_BACKENDS[name]
    except KeyError:
        raise InvalidParameterError("linear_backend", f"must be one of {sorted(LINEAR_BACKENDS)}, got {name!r}")
    return transform(model)
