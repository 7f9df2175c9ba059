"""Attention backends by name: ``ATTENTION_BACKENDS`` and ``build_attention_backend``.

The engine config's ``attention_backend`` field ("torch" | "triton") is
looked up here once per model runner; the instance goes on every step's
``AttentionMetadata.backend``.
"""

from __future__ import annotations

from tierserve.errors import InvalidParameterError
from tierserve.kernels.attention.base import AttentionBackend
from tierserve.kernels.attention.triton_backend import TritonAttention
from tierserve.kernels.paged_attention import TorchAttention

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {cls.name: cls for cls in (TorchAttention, TritonAttention)}


def build_attention_backend(name: str) -> AttentionBackend:
    cls = ATTENTION_BACKENDS.get(name)
    if cls is None:
        raise InvalidParameterError("attention_backend",
                                    f"unknown backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    return cls()
