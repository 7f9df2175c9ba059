"""QuantizedEmbedding: a token-embedding table kept packed; a lookup widens only the rows it reads.

``forward(ids) = W[ids]`` cast to the model dtype, where W is held as a
``PackedWeight`` (e.g. GGUF Q8_0 ``token_embd``). Formats with a row decoder
(``dequantize_rows``, the ggml block formats) gather the packed rows first, so a
step widens ``len(ids) x hidden`` values, never the table. ``tied_head()``
returns the ``QuantizedLinear`` of the same buffers for models whose LM head is
the embedding matrix (``logits = h E^T``), so the table is stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.kernels.quant.base import PackedWeight, QuantizedLinear, WeightFormat


class QuantizedEmbedding(nn.Module):
    def __init__(self, fmt: WeightFormat, packed: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.fmt = fmt
        self.num_embeddings, self.embedding_dim = packed.shape
        self.dtype = dtype
        self.meta = dict(packed.meta)
        for key, tensor in packed.tensors.items():
            self.register_buffer(key, tensor)
        self._keys = tuple(packed.tensors)

    def packed(self) -> PackedWeight:
        return PackedWeight(self.fmt.name, (self.num_embeddings, self.embedding_dim),
                            {k: getattr(self, k) for k in self._keys}, self.meta)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = getattr(self.fmt, "dequantize_rows", None)
        if rows is not None:
            return rows(self.packed(), ids).to(self.dtype)
        return self.fmt.dequantize(self.packed())[ids].to(self.dtype)

    def tied_head(self) -> QuantizedLinear:
        """``h E^T`` over the same packed buffers (no copy)."""
        return QuantizedLinear(self.fmt, self.packed())

    def extra_repr(self) -> str:
        return f"format={self.fmt.name}, num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
