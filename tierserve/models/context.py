"""ForwardContext: what a model's forward needs besides token ids and positions."""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.paged_attention import AttentionMetadata


@dataclass
class ForwardContext:
    """The step's attention metadata and the per-layer KV pages (index = layer id)."""

    attn: AttentionMetadata
    kv_caches: list[LayerKV]
