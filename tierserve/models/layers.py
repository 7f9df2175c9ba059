"""Building blocks shared by the model files: RMSNorm, the gated MLP, fused linears, weight slots.

- ``RMSNorm``: ``y = x / sqrt(mean(x^2) + eps) * w`` computed in float32 and cast
  back (Llama: the cast happens before the multiply by ``w``). In float32 (no cast to
  place) it is one ``F.rms_norm`` call, which runs the same float32 ops (tests: equal
  to the explicit formula), or in eager on the CPU one call of kernels/decoder_rows_cpu.py
  (the same formula in C++; ~2 us against ~20 us a decode row). With
  ``unit_offset=True`` (Gemma) the weight is stored as ``w - 1``: ``y = norm(x) * (1 + w)``
  in float32, then cast.
- ``GatedMLP``: ``down(act(gate(x)) * up(x))`` with gate and up fused into one
  ``gate_up_proj`` Linear (rows ``[0, I)`` = gate, ``[I, 2I)`` = up), so a layer runs
  two matmuls; ``act`` is silu (Llama/Qwen/Mixtral) or tanh-approximated gelu (Gemma).
- ``Slot``: where one HF checkpoint tensor lands in our parameters: a parameter
  and a row range along dim 0 (fused projections stack several HF tensors).
  Each module's ``hf_slots(prefix)`` maps HF names to slots; ``load_weights``
  (in ``base.py``) copies each tensor into its slot and checks shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tierserve.errors import ModelLoadError
from tierserve.kernels import decoder_rows_cpu


@dataclass(frozen=True)
class Slot:
    """Rows ``[start, end)`` of ``param`` (dim 0); ``end=None`` means the whole tensor."""

    param: torch.Tensor
    start: int = 0
    end: int | None = None

    def target(self) -> torch.Tensor:
        return self.param.data if self.end is None else self.param.data[self.start:self.end]


def linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    """An uninitialised Linear (weights come from the checkpoint)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=dtype,
                                    device=torch.get_default_device())  # skip_init defaults to the CPU


def fused_slots(layer: nn.Linear, prefix: str, names: list[str], sizes: list[int]) -> dict[str, Slot]:
    """Slots for HF tensors ``{prefix}{name}.weight`` (and ``.bias``) stacked in ``layer`` by rows."""
    slots: dict[str, Slot] = {}
    start = 0
    for name, size in zip(names, sizes):
        slots[f"{prefix}{name}.weight"] = Slot(layer.weight, start, start + size)
        if layer.bias is not None:
            slots[f"{prefix}{name}.bias"] = Slot(layer.bias, start, start + size)
        start += size
    return slots


def linear_slots(layer: nn.Linear, name: str) -> dict[str, Slot]:
    slots = {f"{name}.weight": Slot(layer.weight)}
    if layer.bias is not None:
        slots[f"{name}.bias"] = Slot(layer.bias)
    return slots


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype) if unit_offset else torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.unit_offset and self.weight.dtype == torch.float32:
            if decoder_rows_cpu.applies(x, self.weight):  # eager on the CPU: one C++ call (kernels/decoder_rows_cpu.py)
                return decoder_rows_cpu.rms_norm(x, self.weight, self.eps)
            # one dispatch for the same float32 ops (pow, mean, add eps, rsqrt, mul, mul by w)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)

    def hf_slots(self, name: str) -> dict[str, Slot]:
        return {f"{name}.weight": Slot(self.weight)}


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(f"hidden activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}") from None


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``hf_names`` = HF (gate, up, down) names, e.g. Mixtral's (w1, w3, w2)."""

    def __init__(self, hidden: int, intermediate: int, act: str, dtype: torch.dtype, bias: bool = False,
                 hf_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.intermediate = intermediate
        self.hf_names = hf_names
        self.act = activation(act)
        self.gate_up_proj = linear(hidden, 2 * intermediate, bias, dtype)
        self.down_proj = linear(intermediate, hidden, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def hf_slots(self, prefix: str) -> dict[str, Slot]:
        gate, up, down = self.hf_names
        slots = fused_slots(self.gate_up_proj, prefix, [gate, up], [self.intermediate] * 2)
        slots.update(linear_slots(self.down_proj, prefix + down))
        return slots
