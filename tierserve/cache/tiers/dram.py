"""The DRAM tier: LMCache's ``LocalCPUBackend`` as an LRU hot cache of chunk records in host memory.

The runtime's CPU backend (lmcache_runtime.py) is the allocator of every
record; with this tier its buffer of ``dram_gib`` also keeps the records it is
given (LMCache's ``local_cpu=True``), evicting the least recently used when an
allocation needs room. A hit in a slower tier is put here too
(``caches_lower_hits``), so the next lookup of that chunk is served from DRAM.
Holdings: LMCache's own index (``get_keys()``), so LRU evictions show at the
next report. Private to the process.
"""

from __future__ import annotations

import dataclasses

from tierserve.cache.tiers.backend import BackendHoldings
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.lmcache_runtime import LMCacheOptions, LMCacheRuntime, LMCacheTier


class DRAMBackend(LMCacheTier):
    name = "dram"
    caches_lower_hits = True

    @classmethod
    def lmcache_options(cls, options: LMCacheOptions, config: KVTierConfig) -> LMCacheOptions:
        return dataclasses.replace(options, hot_cache=True)

    def __init__(self, runtime: LMCacheRuntime, config: KVTierConfig) -> None:
        super().__init__(runtime, runtime.cpu)

    def holdings(self) -> BackendHoldings:
        return BackendHoldings(self.runtime.own_keys(self._store.get_keys()))

    def close(self) -> None:
        """Nothing of its own: the CPU backend is the runtime's, closed by ``LMCacheRuntime.close``."""
