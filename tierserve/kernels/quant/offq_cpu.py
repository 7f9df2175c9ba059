"""CPU fast path of the ``offq`` format (offq_format.py) on torch's int4 CPU kernel (int4_cpu.py).

The weight codes, bf16 scales ``s`` and kernel-form zeros ``z`` of ``offq``
are exactly the kernel's ``W = (q - 8) sz0 + sz1``, so ``pack_int4`` holds
them unchanged. The kernel needs a group in ``INT4_GROUPS`` (32..256): an
``offq`` group that is one (``group`` option) is used as is; a per-channel
weight (one scale per row) uses the largest kernel group dividing ``in`` and
repeats the row's ``s``/``z`` over its groups (the same weights). No such
group (``in`` not a multiple of 32), or no int4 ops: no fast path (None; the
torch reference stays).

Activations: the input transform of the reference (``fmt.rotate_input``),
then with W4A4 the per-token codes ``q`` (integers in [-8, 7], exact in bf16)
go into the kernel and the output row is multiplied by the token's scale
``s_t`` in float32: ``y = s_t (q W_hat^T)``. The kernel accumulates in fp32
and rounds its output to bf16, which is the only departure from the reference
``(q s_t) W_hat^T`` besides summation order: per element at most
``2^-9 |q W^T| s_t`` (bf16 round to nearest) plus the fp32 order error (the
tests derive their bound from this). W4A16 (``act_quant`` off) casts ``x''``
to bf16 as ``int4_cpu`` does (a further ``2^-9`` relative per activation).
``fold`` and the bias are added in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.kernels.quant.base import PackedWeight
from tierserve.kernels.quant.int4_cpu import COMPUTE_DTYPE, INT4_GROUPS, int4_available, pack_int4
from tierserve.kernels.quant.offq_format import OffQFormat, quantize_tokens, unpack_nibbles


def kernel_group(packed: PackedWeight) -> int | None:
    """The int4 kernel group for this weight (module docstring), or None."""
    cols, group = packed.shape[1], int(packed.meta["group"])
    if group in INT4_GROUPS:
        return group
    if group != cols:
        return None
    fits = [g for g in INT4_GROUPS if cols % g == 0]
    return max(fits) if fits else None


class OffQInt4Linear(nn.Module):
    """``offq`` on the int4 CPU kernel: ``s_t (q W_hat^T) + fold + b`` (module docstring)."""

    def __init__(self, fmt: OffQFormat, packed: PackedWeight, bias: torch.Tensor | None, group: int):
        super().__init__()
        self.fmt, self.meta, self.group = fmt, dict(packed.meta), group
        self.out_features, self.in_features = packed.shape
        t = packed.tensors
        repeat = int(self.meta["group"]) // group  # kernel groups per offq group (1 unless per channel)
        s = t["scale"].float().repeat_interleave(repeat, dim=1)
        z = t["zero"].float().repeat_interleave(repeat, dim=1)
        codes = unpack_nibbles(t["qweight"]).to(torch.int32)
        packed_w, sz = pack_int4(codes, s, z, group)
        self.register_buffer("packed_w", packed_w)
        self.register_buffer("sz", sz)
        self._rotation = {k: t[k] for k in ("v", "offset") if k in t}
        for key, tensor in self._rotation.items():
            self.register_buffer(key, tensor)
        self.register_buffer("fold", t.get("fold"))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _packed_view(self) -> PackedWeight:
        tensors = {k: getattr(self, k) for k in self._rotation}
        return PackedWeight(self.fmt.name, (self.out_features, self.in_features), tensors, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xr = self.fmt.rotate_input(x.reshape(-1, self.in_features), self._packed_view())
        scale = None
        if self.meta.get("act_quant"):
            xr, scale = quantize_tokens(xr)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xr.to(COMPUTE_DTYPE).contiguous(), self.packed_w,
                                                       self.group, self.sz)
        y = y[:, :self.out_features].float()  # rows padded to a multiple of 16 in the pack
        if scale is not None:
            y = y * scale
        if self.fold is not None:
            y = y + self.fold
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"format=offq, rotation={self.meta['rotation']}, in_features={self.in_features}, "
                f"out_features={self.out_features}, group={self.group}, int4pack_bf16")


def offq_cpu_module(q) -> nn.Module | None:
    """The fast CPU module of an ``offq`` QuantizedLinear ``q``, or None (module docstring)."""
    packed = q.packed()
    group = kernel_group(packed)
    if group is None or not int4_available():
        return None
    return OffQInt4Linear(q.fmt, packed, q.bias, group)
