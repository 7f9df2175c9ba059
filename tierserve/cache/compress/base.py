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

A storage compressor and an eviction compressor compose
(``ComposedCompressor``, ``--kv-compression kv4,expected_attention``): the
storage one allocates the pages, the eviction one decides which blocks go
and reads the pages it scores through ``layer_pages`` (dequantized for
packed pages, so it scores what attention will see). Two of the same kind
do not compose (KVCompressionConfig refuses them). Eviction is not combined
with the KV tiers (LLMEngine refuses it: a table with evicted blocks no
longer maps to token chunks).

Registry: ``KV_COMPRESSORS`` maps the CLI name (``--kv-compression``) to the
class; ``build_compressor(config, spec)`` instantiates one, or composes two. The registry is
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

    def keep_recent(self, window: int) -> None:
        """The model's largest sliding window: an eviction method keeps the tokens inside it (eviction.py)."""

    def blocks_to_evict(self, seq: SeqKV) -> list[int]:
        """Indices into ``seq.block_ids`` to drop now (never 0 or the last); [] keeps everything."""
        return []

    def release(self, request_id: str) -> None:
        """Forget per-request state (finished, aborted or preempted)."""


def layer_pages(kv, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer's pages ``block_ids``, ``[len * block_size, kv_heads, head_dim]`` fp32.

    Plain pages (``LayerKV``) are indexed; packed pages (anything with ``gather(table)``, e.g. kv4's
    ``PackedLayerKV``) are dequantized exactly as paged attention reads them.
    """
    gather = getattr(kv, "gather", None)
    if gather is not None:
        table = torch.tensor([list(block_ids)], dtype=torch.long, device=kv.device)
        k, v = gather(table)
        return k[0].float(), v[0].float()
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=kv.k.device)
    heads, dim = kv.k.shape[-2], kv.k.shape[-1]
    k = torch.index_select(kv.k, 0, ids).reshape(-1, heads, dim)
    v = torch.index_select(kv.v, 0, ids).reshape(-1, heads, dim)
    return k.float(), v.float()


class ComposedCompressor(KVCompressor):
    """A storage compressor's pages with an eviction compressor's policy (see the module docstring)."""

    evicts = True

    def __init__(self, storage: KVCompressor, eviction: KVCompressor):
        if storage.evicts or not eviction.evicts:
            raise ValueError(f"compose a storage compressor with an eviction one, got {storage.name!r} "
                             f"and {eviction.name!r}")
        super().__init__(eviction.config, eviction.spec)
        self.storage, self.eviction = storage, eviction
        self.name = f"{storage.name}+{eviction.name}"

    def page_size_bytes(self) -> int:
        return self.storage.page_size_bytes()

    def allocate_cache(self, num_blocks: int, device: str | torch.device = "cpu") -> list:
        return self.storage.allocate_cache(num_blocks, device)

    def bind(self, model: torch.nn.Module, kv_caches: list) -> None:
        super().bind(model, kv_caches)
        self.storage.bind(model, kv_caches)
        self.eviction.bind(model, kv_caches)

    def after_step(self, sched) -> None:
        self.eviction.after_step(sched)

    def keep_recent(self, window: int) -> None:
        self.eviction.keep_recent(window)

    def blocks_to_evict(self, seq: SeqKV) -> list[int]:
        return self.eviction.blocks_to_evict(seq)

    def release(self, request_id: str) -> None:
        self.eviction.release(request_id)


KV_COMPRESSORS: dict[str, type[KVCompressor]] = {}


def register(cls: type[KVCompressor]) -> type[KVCompressor]:
    if not cls.name or cls.name in KV_COMPRESSORS:
        raise ValueError(f"compressor name {cls.name!r} is empty or already registered")
    KV_COMPRESSORS[cls.name] = cls
    return cls


def build_compressor(config, spec: KVSpec) -> KVCompressor | None:
    """The compressor for a KVCompressionConfig: None when off, one, or a storage + eviction composition."""
    if not config.enabled:
        return None
    unknown = [m for m in config.methods if m not in KV_COMPRESSORS]
    if unknown:
        raise InvalidParameterError("kv_compression", f"must be one of {sorted(KV_COMPRESSORS)}, "
                                                      f"got {unknown[0]!r}")
    parts = sorted((KV_COMPRESSORS[m](config, spec) for m in config.methods), key=lambda c: c.evicts)
    if len(parts) == 1:
        return parts[0]
    return ComposedCompressor(*parts)  # KVCompressionConfig allows at most one of each kind


# Fill the registry (each module registers its class on import).
from tierserve.cache.compress import kv4, paged_eviction, expected_attention, streaming, xquant, xquant_cl  # noqa: E402,F401,E501
