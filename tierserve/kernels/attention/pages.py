"""What the triton kernels read of one layer's pages: plain K/V or 4-bit packed K/V.

``PageView`` names the tensors a kernel dereferences and their strides, so the
kernels read pages in place through the block table (no gather copy):

- plain (``LayerKV``): ``k``/``v`` ``[num_blocks, block_size, Hkv, D]``;
- ``int4`` (the kv4 format of ``cache/compress/kv4.py``, read here through
  its attributes since the cache package sits above the kernels): codes
  ``[num_blocks, block_size, Hkv, D/2]`` uint8 (channel ``2j`` in the low
  nibble, ``2j+1`` in the high one), fp16 ``scale``/``zero`` ``[..., D/g]``;
  ``x = zero + code * scale`` per group of ``g`` channels. Keys are stored
  rotated (``k' = k H``, ``H`` the orthonormal symmetric Hadamard matrix), so
  ``q . k = (q H) . k'``: the kernels are given ``q H`` and never un-rotate
  keys. Values are stored unrotated.

For plain pages the scale/zero slots repeat the K/V tensors (never read:
``quant`` is a constexpr of the kernels) and their strides are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError


@dataclass(frozen=True)
class PageView:
    """Pointers and strides of one layer's K and V pages as the kernels read them."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    quant_group: int  # 0 for plain pages, else the int4 group size g
    rotation: torch.Tensor | None  # Hadamard matrix applied to the stored keys (int4 only)

    @property
    def quantized(self) -> bool:
        return self.quant_group > 0

    def strides(self) -> tuple[int, int, int, int, int, int]:
        """(block, token, head) strides of the code/value tensors, then of the scale/zero tensors."""
        s = self.k.stride()[:3]
        z = self.k_scale.stride()[:3] if self.quantized else (0, 0, 0)
        return (*s, *z)

    def prepare_query(self, q: torch.Tensor) -> torch.Tensor:
        """The query the kernel dots with the stored keys: ``q`` itself, or ``q H`` for rotated int4 keys."""
        if self.rotation is None:
            return q if q.stride(-1) == 1 else q.contiguous()
        return (q.float() @ self.rotation).to(q.dtype)


def page_view(kv) -> PageView:
    """``PageView`` of a ``LayerKV`` or a kv4 ``PackedLayerKV`` (``k_packed``/``v_packed``/``group``/``rotation``)."""
    packed_k = getattr(kv, "k_packed", None)
    if packed_k is None and not (isinstance(getattr(kv, "k", None), torch.Tensor) and kv.k.dim() == 4):
        raise InvalidParameterError("attention_backend", f"the triton kernels read plain or kv4 pages; "
                                                         f"{type(kv).__name__} pages need attention_backend=torch")
    if packed_k is None:
        _same_layout("kv.v", kv.v, kv.k)
        return PageView(kv.k, kv.v, kv.k, kv.k, kv.v, kv.v, 0, None)
    packed_v = kv.v_packed
    for name, t in (("codes", packed_v.codes), ("scale", packed_k.scale), ("zero", packed_k.zero)):
        ref = packed_k.codes if name == "codes" else packed_k.scale
        _same_layout(f"kv.v_packed.{name}", t, ref)
    _same_layout("kv.k_packed.zero", packed_v.zero, packed_k.scale)
    _same_layout("kv.v_packed.scale", packed_v.scale, packed_k.scale)
    dim, group = 2 * packed_k.codes.shape[-1], int(kv.group)
    if dim & (dim - 1) or dim % group:
        raise InvalidParameterError("kv_group_size", f"int4 pages need a power-of-two head_dim divisible by the "
                                                     f"group size; head_dim {dim}, group size {group}")
    return PageView(packed_k.codes, packed_v.codes, packed_k.scale, packed_k.zero, packed_v.scale, packed_v.zero,
                    int(kv.group), kv.rotation)


def _same_layout(field: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """The kernels pass one set of strides for K and V (and for scale and zero): they must match."""
    if t.shape != ref.shape or t.stride() != ref.stride() or t.stride(-1) != 1:
        raise InvalidParameterError(
            field, f"paged attention kernels need K and V pages of one contiguous-last-dim layout; "
                   f"got shape {tuple(t.shape)} strides {t.stride()} against {tuple(ref.shape)} {ref.stride()}")


def upcast_dots(q: torch.Tensor) -> bool:
    """bf16 dots run as rounded-then-widened fp32 off CUDA (``page_tile_triton.dot_operand``)."""
    return q.dtype == torch.bfloat16 and not q.is_cuda


def dot_precision(q: torch.Tensor) -> str:
    """fp32 (and widened bf16) dots keep full precision, no TF32; 16-bit dots use the tensor cores as is."""
    return "ieee" if q.dtype == torch.float32 or upcast_dots(q) else "tf32"
