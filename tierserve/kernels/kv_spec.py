"""KVSpec: the layout of one model's paged KV cache, with every derived size.

Storage per layer is two tensors (K and V) of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; token slot ``s`` lives at
block ``s // block_size``, offset ``s % block_size``. Byte math lives here only.
"""

from __future__ import annotations

from dataclasses import dataclass

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"
    hidden_size: int = 0  # the model's hidden width (0: not given); formats that cache the layer input need it

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"KVSpec.dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size < 0:
            raise ValueError(f"KVSpec.hidden_size must be >= 0, got {self.hidden_size}")

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def token_bytes_per_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def page_size_bytes(self) -> int:
        """One block (page) across all layers, K and V."""
        return self.block_size * self.token_bytes_per_layer * self.num_layers

    def num_blocks_for_bytes(self, budget_bytes: int) -> int:
        return max(1, budget_bytes // self.page_size_bytes)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
