"""The DRAM tier: LMCache's ``LocalCPUBackend`` as an LRU hot cache of chunk records in host memory.

The runtime's CPU backend (lmcache_runtime.py) is the allocator of every
record; with this tier its buffer of ``dram_gib`` also keeps the records it is
given (LMCache's ``local_cpu=True``), evicting the least recently used when an
allocation needs room. A hit in a slower tier is put here too
(``caches_lower_hits``), so the next lookup of that chunk is served from DRAM.
Holdings: LMCache's own index (``get_keys()``), so LRU evictions show at the
next report. Private to the process.

Recency: LMCache's ``get_blocking`` does not touch its cache policy (its
vLLM path does, through ``contains(pin=True)`` and ``touch_cache``), so
without help the buffer would evict in insertion order; ``get`` therefore
marks every hit as used (``cache_policy.update_on_hit`` under the backend's
lock). Tested: tests/test_kv_tiers_lru.py (a read chunk outlives older
unread ones).
"""

from __future__ import annotations

import dataclasses

from tierserve.cache.tiers.backend import BackendHoldings
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.lmcache_runtime import ChunkBuffer, LMCacheOptions, LMCacheRuntime, LMCacheTier


class DRAMBackend(LMCacheTier):
    name = "dram"
    caches_lower_hits = True

    @classmethod
    def lmcache_options(cls, options: LMCacheOptions, config: KVTierConfig) -> LMCacheOptions:
        return dataclasses.replace(options, hot_cache=True)

    def __init__(self, runtime: LMCacheRuntime, config: KVTierConfig) -> None:
        super().__init__(runtime, runtime.cpu)

    def get(self, key: bytes) -> ChunkBuffer | None:
        """A hit also becomes the most recently used record (module docstring: Recency)."""
        found = super().get(key)
        if found is not None:
            store, lm_key = self._store, self.runtime.key(key)
            with store.cpu_lock:
                if lm_key in store.hot_cache:
                    store.cache_policy.update_on_hit(lm_key, store.hot_cache)
        return found

    def holdings(self) -> BackendHoldings:
        return BackendHoldings(self.runtime.own_keys(self._store.get_keys()))

    def close(self) -> None:
        """Nothing of its own: the CPU backend is the runtime's, closed by ``LMCacheRuntime.close``."""
