"""KVCompressor: the contract every KV-cache compressor follows, and the registry that picks one.

Two kinds of compressor share the interface:

- *storage* compressors (``evicts = False``, e.g. ``kv4``) change how pages
  are stored: ``allocate_cache`` returns per-layer caches with the
  ``LayerKV`` contract (``write(slot_mapping, k, v)``) plus
  ``gather(table) -> (keys, values)`` returning dequantized pages, which
  paged attention calls instead of indexing raw tensors; ``page_size_bytes``
  is the real size of one block so the engine fits more blocks in the same
  memory.
- *eviction* compressors (``evicts = True``: PagedEviction, Expected
  Attention, StreamingLLM) keep a per-sequence token budget by dropping whole
  blocks from a sequence's block table (``blocks_to_evict``). The attention
  kernel does not change: keys carry RoPE already, so attending over the kept
  blocks is exact for what is kept, as long as the new token's *position*
  keeps counting real positions while its *slot* and the sequence length
  count kept tokens (``KVCacheManager.num_evicted_tokens``; the runner uses
  ``slot index = position - evicted``).

Lifecycle, driven by ``LLMEngine`` through ``driver.EvictionDriver``:
``bind(model, kv_caches)`` once after the pages exist; ``after_step(sched)``
after every forward (observe hidden states, etc.); ``blocks_to_evict(seq)`` for
every sequence that ran in the step; ``release(request_id)`` when a request
finishes, aborts or is preempted.

One compressor per engine (storage and eviction do not combine yet), and
not together with the KV tiers (LLMEngine refuses the combination: a table
with evicted blocks no longer maps to token chunks, and packed pages have no
``k``/``v`` tensors to copy).

Registry: ``KV_COMPRESSORS`` maps the CLI name (``--kv-compression``) to the
class; ``build_compressor(config, spec)`` instantiates it. The registry is
filled by importing the implementation modules at the bottom of this file.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec
from tierserve.errors import InvalidParameterError


@dataclass(frozen=True)
class SeqKV:
    """One sequence's kept KV as a compressor sees it after a step.

    ``block_ids``: the block table (kept blocks, oldest first); ``num_kept``:
    tokens in them (only the last block may be partly filled);
    ``position``: real tokens computed so far (the next token's position);
    ``num_step_tokens``: tokens computed in this step (1 for a decode step).
    """

    request_id: str
    block_ids: Sequence[int]  # the request's live table (read-only here; not copied per step)
    num_kept: int
    position: int
    num_prompt_tokens: int
    num_step_tokens: int


class KVCompressor(ABC):
    """Base class; subclasses set ``name`` and override the hooks they need (see module docstring)."""

    name: ClassVar[str] = ""
    evicts: ClassVar[bool] = False

    def __init__(self, config, spec: KVSpec):
        self.config = config
        self.spec = spec

    # -- storage ---------------------------------------------------------------------------
    def page_size_bytes(self) -> int:
        """Bytes of one block across all layers, K and V, as this compressor stores it."""
        return self.spec.page_size_bytes

    def allocate_cache(self, num_blocks: int, device: str | torch.device = "cpu") -> list:
        return allocate_kv_cache(self.spec, num_blocks, device)

    # -- eviction --------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, kv_caches: list) -> None:
        """Remember the model and its pages (eviction compressors read K/V to score tokens)."""
        self.model = model
        self.kv_caches = kv_caches

    def after_step(self, sched) -> None:
        """Called after each forward with the step's SchedulerOutput (before any eviction)."""

    def blocks_to_evict(self, seq: SeqKV) -> list[int]:
        """Indices into ``seq.block_ids`` to drop now (never 0 or the last); [] keeps everything."""
        return []

    def release(self, request_id: str) -> None:
        """Forget per-request state (finished, aborted or preempted)."""


KV_COMPRESSORS: dict[str, type[KVCompressor]] = {}


def register(cls: type[KVCompressor]) -> type[KVCompressor]:
    if not cls.name or cls.name in KV_COMPRESSORS:
        raise ValueError(f"compressor name {cls.name!r} is empty or already registered")
    KV_COMPRESSORS[cls.name] = cls
    return cls


def build_compressor(config, spec: KVSpec) -> KVCompressor | None:
    """The compressor for a KVCompressionConfig (None for method "none")."""
    if not config.enabled:
        return None
    cls = KV_COMPRESSORS.get(config.method)
    if cls is None:
        raise InvalidParameterError("kv_compression", f"must be one of {sorted(KV_COMPRESSORS)}, "
                                                      f"got {config.method!r}")
    return cls(config, spec)


# Fill the registry (each module registers its class on import).
from tierserve.cache.compress import kv4, paged_eviction, expected_attention, streaming  # noqa: E402,F401
