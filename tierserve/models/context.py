"""ForwardContext: what a model's forward needs besides token ids and positions.

``rope_tables(cos, sin)``: the step's widened RoPE tables (``rope.rope_tables``), built once per
step on the first layer's call and reused by every layer (memoised on these cos/sin tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.rope import rope_tables


@dataclass
class ForwardContext:
    """The step's attention metadata and the per-layer KV pages (index = layer id)."""

    attn: AttentionMetadata
    kv_caches: list[LayerKV]
    _rope: tuple | None = field(default=None, repr=False)

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope.rope_tables(cos, sin)``, memoised: every layer of a step passes the same tensors."""
        memo = self._rope
        if memo is not None and memo[0] is cos and memo[1] is sin:
            return memo[2]
        tables = rope_tables(cos, sin)
        self._rope = (cos, sin, tables)
        return tables
