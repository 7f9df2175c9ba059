"""RequestView: what the KV bookkeeping and the step hooks read of a request (no torch).

The engine's ``Request`` (tierserve/engine/request.py) satisfies it structurally. The KV cache
manager writes ``block_ids`` and ``num_computed_tokens`` (it owns the block table); everything else
is read-only to the layers below the engine.
"""

from __future__ import annotations

from typing import Protocol


class RequestView(Protocol):
    request_id: str
    block_ids: list[int]
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""

    @property
    def num_prompt_tokens(self) -> int: ...

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Slice of prompt + output tokens."""
