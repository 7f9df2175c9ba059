"""Paged KV storage tensors (torch side of the cache; bookkeeping is in block_pool).

Allocated once at engine start and never reallocated: decode writes new
tokens in place through a slot mapping, so the storage keeps its data_ptr for
the engine's life.
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
        """Store ``k``/``v`` ([T, kv_heads, head_dim]) at flat token slots, in place."""
        heads, dim = k.shape[-2], k.shape[-1]
        self.k.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(self.k.dtype))
        self.v.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(self.v.dtype))


def allocate_kv_cache(spec: KVSpec, num_blocks: int, device: str | torch.device = "cpu") -> list[LayerKV]:
    dtype = getattr(torch, spec.dtype)
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(spec.num_layers)
    ]
