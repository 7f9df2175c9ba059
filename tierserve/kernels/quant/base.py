"""Weight formats: the contract every quantization scheme implements, and its registry.

A ``WeightFormat`` turns a float weight ``W [out, in]`` into a ``PackedWeight``
(named tensors plus scalar metadata), turns it back (``dequantize``, the torch
reference), and multiplies activations by it (``linear``: ``y = x W^T + b``).
The default ``linear`` is the reference (dequantize, then F.linear); formats
override it with a packed kernel (triton on GPU) and tests compare the two.
CPU fast paths that need a one-time repack are separate modules swapped in
for ``QuantizedLinear`` by ``cpu_fast.accelerate_quantized`` (the engine's
linear backend), with the reference kept as the oracle. ``check_shape`` raises InvalidParameterError naming the tensor and the
rule (e.g. in-features not a multiple of the group) before any work.

Formats are picked by name from ``WEIGHT_FORMATS`` (``register_format``), never
by if/elif. ``QuantizedLinear`` is the module a quantization transform swaps in
for ``nn.Linear``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from tierserve.errors import InvalidParameterError


@dataclass
class PackedWeight:
    """A quantized weight: ``tensors`` (e.g. ``{"qs": uint8, "d": float16}``) and scalar ``meta``."""

    format: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class WeightFormat(ABC):
    """One packed weight format. Subclasses set ``name`` and implement quantize/dequantize."""

    name: ClassVar[str]

    def check_shape(self, tensor_name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise InvalidParameterError(tensor_name, f"{self.name} quantizes 2-D weights, got shape {list(shape)}")

    @abstractmethod
    def quantize(self, weight: torch.Tensor, tensor_name: str = "weight") -> PackedWeight: ...

    @abstractmethod
    def dequantize(self, packed: PackedWeight) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reference matmul: dequantize then F.linear (formats override with packed kernels)."""
        w = self.dequantize(packed).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)


WEIGHT_FORMATS: dict[str, type[WeightFormat]] = {}


def register_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    if cls.name in WEIGHT_FORMATS:
        raise ValueError(f"weight format {cls.name!r} registered twice")
    WEIGHT_FORMATS[cls.name] = cls
    return cls


def get_format(name: str, **options) -> WeightFormat:
    try:
        cls = WEIGHT_FORMATS[name]
    except KeyError:
        raise InvalidParameterError("scheme", f"unknown weight format {name!r}; known: {sorted(WEIGHT_FORMATS)}")
    return cls(**options)


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W kept packed; the packed tensors are buffers named after the format's keys."""

    def __init__(self, fmt: WeightFormat, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = packed.shape
        self.meta = dict(packed.meta)
        for key, tensor in packed.tensors.items():
            self.register_buffer(key, tensor)
        self._keys = tuple(packed.tensors)
        self.register_buffer("bias", bias)

    def packed(self) -> PackedWeight:
        return PackedWeight(self.fmt.name, (self.out_features, self.in_features),
                            {k: getattr(self, k) for k in self._keys}, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.linear(x, self.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, in_features={self.in_features}, out_features={self.out_features}"


def swap_quantized_linears(model: nn.Module, build) -> int:
    """Replace every ``QuantizedLinear`` of ``model`` for which ``build(q)`` returns a module by that module.

    A linear registered under several names (a tied head) is built once and swapped everywhere; ``build``
    returning None leaves it as it is. Returns how many distinct linears were replaced.
    """
    done: dict[int, nn.Module | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, QuantizedLinear):
                continue
            if id(child) not in done:
                done[id(child)] = build(child)
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])
    return sum(m is not None for m in done.values())

