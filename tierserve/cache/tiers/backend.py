"""TierBackend: the contract of one lower KV tier (DRAM, disk, Redis), a store of chunk records by key.

A tier stores *chunk records* (chunk.py: a self-checking header + the chunk's
KV payload) under *chunk keys* (the 32-byte chained SHA-256 block hash of a
chunk's last block). Records live in host buffers from LMCache's allocator
(``ChunkBuffer``, lmcache_runtime.py); every tier of a connector shares one
``LMCacheRuntime``. The connector (connector.py) holds its backends in lookup
order (fastest first, ``KVTierConfig.tiers``) and never asks which tier a
backend is: everything tier-specific sits behind this contract.

Contract (every implementation):

* ``contains(key)``: whether the tier holds a record for ``key`` now.
* ``get(key)``: that record as a ``ChunkBuffer`` the caller must
  ``release()`` exactly once, or None when the tier does not have it. The
  record is returned as stored: the caller checks it (``verify_record``).
* ``put(key, record)``: hand the record to the tier, which takes its own
  reference (the caller still releases its own). Writes to disk and Redis
  finish asynchronously: ``contains`` turns true once they land. Returns
  False when the tier skipped the store (Redis while its breaker is open).
* ``remove(key)``: drop the key's record (one that failed its checksum, so it
  is not read again); best effort, a failure is logged.
* ``holdings()``: what the tier reports to the router (``BackendHoldings``):
  a tier private to this process lists the keys it holds now, read from its
  own index, so LRU evictions show; a tier shared with other processes
  (``keys`` None: others change it behind this one's back) reports the net
  last event per key since its previous ``holdings()`` call instead (True:
  held, False: missing), and the call drains them.
* ``close()``: release what the backend started (files, connections); the
  connector closes the shared runtime after every backend.
* No method raises for the tier's own failures (an unreadable file, a
  refused or timed-out connection): it logs a warning, adds one to
  ``failures`` and answers as a miss (``contains`` False, ``get`` None,
  ``put`` False), so a tier can only make a lookup shorter, never fail a
  request. ``put`` also answers False, without a failure, for a key whose
  write is still in flight (LMCache would skip it), so a store is counted
  once. A put accepted (True) whose asynchronous write fails later adds one
  to ``failures`` and one to ``lost_puts`` (the connector then takes its
  bytes back out of ``bytes_stored``).
* ``name``: the tier's name in ``KVTierConfig.tiers`` and in every stats
  dict. ``caches_lower_hits``: a hit in a slower tier is also put into this
  one (the DRAM hot cache).
* Construction: ``cls(runtime, config)``; before the runtime exists,
  ``cls.lmcache_options(options, config)`` adds the LMCache engine settings
  the tier needs (a disk folder, a Redis URL) to the shared ``LMCacheOptions``.

Implementations: dram.py, disk.py, redis.py; the registry name -> class is
registry.py. Tests: tests/test_kv_tiers_backends.py runs every backend
through put / contains / get / remove / holdings and Redis through its
failure path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from tierserve.cache.tiers.config import KVTierConfig
    from tierserve.cache.tiers.lmcache_runtime import ChunkBuffer, LMCacheOptions


@dataclass(frozen=True)
class BackendHoldings:
    """One tier's report to the router: ``keys`` held now (None for a shared tier) and its drained ``events``."""

    keys: frozenset[bytes] | None
    events: Mapping[bytes, bool] = field(default_factory=lambda: MappingProxyType({}))


class TierBackend(ABC):
    """One lower KV tier: contains / get / put / remove chunk records by chunk key (module doc)."""

    name: ClassVar[str]
    caches_lower_hits: ClassVar[bool] = False

    def __init__(self) -> None:
        self.failures = 0  # failed or timed-out tier calls and writes (module doc)
        self.lost_puts = 0  # accepted puts whose asynchronous write failed (module doc)

    @classmethod
    def lmcache_options(cls, options: LMCacheOptions, config: KVTierConfig) -> LMCacheOptions:
        """The shared LMCache settings with what this tier needs added (default: nothing)."""
        return options

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether the tier holds a record for ``key`` now."""

    @abstractmethod
    def get(self, key: bytes) -> ChunkBuffer | None:
        """The stored record (the caller releases it once), or None."""

    @abstractmethod
    def put(self, key: bytes, record: ChunkBuffer) -> bool:
        """Store ``record`` under ``key`` (the tier keeps its own reference); False if skipped."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """Drop ``key``'s record; best effort."""

    @abstractmethod
    def holdings(self) -> BackendHoldings:
        """Keys held now (a private tier) or the drained events since the last call (a shared tier)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend started; called once, before the shared runtime closes."""
