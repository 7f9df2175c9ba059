"""Paged KV storage tensors (torch side of the cache; bookkeeping is in block_pool).

Allocated once at engine start and never reallocated: decode writes new
tokens in place through a slot mapping, so the storage keeps its data_ptr for
the engine's life.

Every page format (this plain one, kv4's packed pages in cache/compress/kv4.py)
lists its storage through ``parts()``: block-major tensors in a fixed order,
which is all the KV tiers need to move whole blocks as bytes
(cache/tiers/chunk_layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.kernels.kv_spec import KVSpec


@dataclass
class LayerKV:
    """One layer's K and V pages, each ``[num_blocks, block_size, kv_heads, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ([T, kv_heads, head_dim]) at flat token slots, in place (cast to the pages' dtype
        only where it differs: ``to`` of the same dtype is still a dispatch, two per layer per step)."""
        heads, dim = k.shape[-2], k.shape[-1]
        kc, vc = self.k, self.v
        kc.view(-1, heads, dim).index_copy_(0, slot_mapping, k if k.dtype == kc.dtype else k.to(kc.dtype))
        vc.view(-1, heads, dim).index_copy_(0, slot_mapping, v if v.dtype == vc.dtype else v.to(vc.dtype))

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The storage tensors, block-major (dim 0 is the block), in a fixed order: K, V."""
        return self.k, self.v


def allocate_kv_cache(spec: KVSpec, num_blocks: int, device: str | torch.device = "cpu") -> list[LayerKV]:
    dtype = getattr(torch, spec.dtype)
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]
