"""CUDA linear backend: packed (quantized) linears run their fused triton kernels on the device.

``accelerate_cuda(model)`` is a transform applied to a built model: every
``QuantizedLinear`` whose buffers live on a CUDA device is swapped, under
every name it is registered (a shared module is converted once), for the
:class:`TritonLinear` that ``GPU_KERNEL_PATHS`` gives its format:

| format          | module              | kernel                                                   |
|-----------------|---------------------|----------------------------------------------------------|
| q4_0/q4_1/q8_0  | GGMLTritonLinear    | ``<format>_triton``: the blocks split once into code and   |
|                 |                     | scale planes (``ggml_planes``), W4A16/W8A16               |
| sinq            | SinqTritonLinear    | ``sinq_triton`` (1/2/4/8 bits, column scale folded into x) |
| mxfp4/nvfp4     | FP4TritonLinear     | ``fp4_triton``: W4A16, or W4A4 when the weight was packed  |
|                 |                     | with ``act_quant`` (activations FP4-quantized per row and  |
|                 |                     | group in torch, decoded in the kernel)                      |
| dfloat11        | DFloat11TritonLinear| ``dfloat11_triton`` decodes the bf16 weight on the device  |
|                 |                     | each call, then ``F.linear`` (bit-identical to bf16)       |
| offq            | OffQTritonLinear    | ``offq_triton``: W4A4 integer dot per weight group (token  |
|                 |                     | codes in torch); W4A16 offq keeps its QuantizedLinear      |

Formats without an entry (sigmascale: two small dense factors) keep their
``QuantizedLinear``. Tile sizes are chosen per call from M and the weight's
shape (``quant/tile_configs.py``); per-layer constants (the FP4 scale table,
the ggml planes) are built once here instead of on every call. The choice is
device-driven: the engine's linear backends "auto" and "triton"
(``cpu_linear.LINEAR_BACKENDS``) call this on every model, and it touches only
CUDA modules, so a CPU model is left to the CPU backend and nothing here
imports triton unless a CUDA ``QuantizedLinear`` exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import nn

from tierserve.kernels.quant.base import QuantizedLinear, swap_quantized_linears


class TritonLinear(nn.Module, ABC):
    """Contract: built from a CUDA ``QuantizedLinear`` (same packed bytes, no re-quantization),
    ``forward(x [..., in])`` returns ``[..., out]`` in x's dtype and equals the format's torch
    reference (dequantize, F.linear) up to fp32 summation order and the dot's input rounding
    (tests/test_gpu_linear.py states the bound)."""

    def __init__(self, q: QuantizedLinear):
        nn.Module.__init__(self)
        self.fmt = q.fmt
        self.out_features, self.in_features = q.out_features, q.in_features
        self.meta = dict(q.meta)
        self.register_buffer("bias", q.bias)

    @abstractmethod
    def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 [M, in] -> [M, out]`` in x2's dtype, bias included."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.linear2d(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, in_features={self.in_features}, out_features={self.out_features}"


class GGMLTritonLinear(TritonLinear):
    """Q4_0 / Q4_1 / Q8_0: the format's fused kernel on the weight split once into code and scale planes
    (``quant/ggml_planes``: the same bytes, each plane contiguous per row, so tiles load with wide loads)."""

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        from tierserve.kernels.quant.ggml_planes import split_planes

        planes = split_planes(q.blocks, q.fmt.type_size, q.fmt.num_meta)
        self.register_buffer("codes", planes.codes)
        self.register_buffer("scales", planes.scales)
        self.register_buffer("mins", planes.mins)
        self._kernel = q.fmt.triton_planes_linear()

    def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        from tierserve.kernels.quant.ggml_planes import GGMLPlanes

        return self._kernel(x2, GGMLPlanes(self.codes, self.scales, self.mins), self.out_features, self.bias)


class SinqTritonLinear(TritonLinear):
    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        for key in ("qweight", "s_row", "z", "s_col"):
            self.register_buffer(key, getattr(q, key).contiguous())
        self.bits, self.group = int(self.meta["bits"]), int(self.meta["group"])

    def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        from tierserve.kernels.quant.sinq_triton import sinq_linear

        return sinq_linear(x2, self.qweight, self.s_row, self.z, self.s_col, self.bits, self.group,
                           bias=self.bias, out_dtype=x2.dtype)


class FP4TritonLinear(TritonLinear):
    """MXFP4 / NVFP4: scale table built once (E2M1 codes decode arithmetically in the kernel); Hadamard
    and W4A4 as the reference does."""

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        packed = q.packed()
        self.register_buffer("qs", packed.tensors["qs"].contiguous())
        self.register_buffer("scales", packed.tensors["scales"].contiguous())
        self.register_buffer("scale_lut", q.fmt.scale_table(packed).float().contiguous())
        self.hadamard = bool(self.meta.get("hadamard"))
        self.act_quant = bool(q.fmt.act_quant or self.meta.get("act_quant"))

    def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        from tierserve.kernels.quant.fp4_triton import fp4_linear_triton
        from tierserve.kernels.quant.hadamard import block_hadamard

        g = self.fmt.group_size
        if self.hadamard:
            x2 = block_hadamard(x2, g)
        act = self.fmt.quantize_activations(x2) if self.act_quant else None
        return fp4_linear_triton(x2, self.qs, self.scales, self.scale_lut, g, self.bias, act,
                                 out_dtype=x2.dtype)


class DFloat11TritonLinear(TritonLinear):
    """DFloat11: the Huffman stream decoded to bf16 on the device every call, then F.linear."""

    def __init__(self, q: QuantizedLinear):
        super().__init__(q)
        from tierserve.kernels.quant.dfloat11 import DF11Stream

        for key in DF11Stream.TENSOR_KEYS:
            self.register_buffer(key, getattr(q, key).contiguous())

    def weight(self) -> torch.Tensor:
        from tierserve.kernels.quant.dfloat11 import DF11Stream, packed_to_stream
        from tierserve.kernels.quant.dfloat11_triton import dfloat11_decode

        stream = packed_to_stream(_packed(self, DF11Stream.TENSOR_KEYS))
        return dfloat11_decode(stream).view(self.out_features, self.in_features)

    def linear2d(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x2, self.weight().to(x2.dtype), self.bias)


def _packed(module: TritonLinear, keys: tuple[str, ...]):
    from tierserve.kernels.quant.base import PackedWeight

    return PackedWeight(module.fmt.name, (module.out_features, module.in_features),
                        {k: getattr(module, k) for k in keys}, module.meta)


def _offq_module(q: QuantizedLinear) -> TritonLinear | None:
    """OffQ W4A4 (``quant/offq_triton.py``; None for a weight its kernel does not take)."""
    from tierserve.kernels.quant.offq_triton import offq_cuda_module

    return offq_cuda_module(q)


GPU_KERNEL_PATHS: dict[str, Callable[[QuantizedLinear], TritonLinear | None]] = {
    "q4_0": GGMLTritonLinear,
    "q4_1": GGMLTritonLinear,
    "q8_0": GGMLTritonLinear,
    "sinq": SinqTritonLinear,
    "mxfp4": FP4TritonLinear,
    "nvfp4": FP4TritonLinear,
    "dfloat11": DFloat11TritonLinear,
    "offq": _offq_module,
}


def on_cuda(module: nn.Module) -> bool:
    buffers = list(module.buffers())
    return bool(buffers) and all(b.device.type == "cuda" for b in buffers)


def cuda_kernel_module(q: QuantizedLinear) -> TritonLinear | None:
    """The triton module for ``q`` (None if its format has none or it is not on a CUDA device)."""
    builder = GPU_KERNEL_PATHS.get(q.fmt.name)
    return builder(q) if builder is not None and on_cuda(q) else None


def accelerate_cuda(model: nn.Module) -> int:
    """Swap every CUDA QuantizedLinear with a kernel path for it; returns how many modules were converted."""
    return swap_quantized_linears(model, cuda_kernel_module)
