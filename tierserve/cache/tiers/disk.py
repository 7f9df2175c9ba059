"""The disk tier: LMCache's ``LocalDiskBackend``, one file per chunk record under ``disk_path``.

Files are named ``<LMCache key>.pt`` (lmcache_runtime.py ``lmcache_key``),
kept LRU within ``disk_gib``, and written asynchronously on LMCache's event
loop, so ``contains`` turns true once a write lands. The index lives in the
process: a disk tier serves the process that wrote it (a restarted or second
process starts empty); sharing across processes goes through Redis. Holdings:
that index (``LocalDiskBackend.dict``, read under its lock).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from tierserve.cache.tiers.backend import BackendHoldings
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.lmcache_runtime import LMCacheOptions, LMCacheRuntime, LMCacheTier

logger = logging.getLogger(__name__)


class DiskBackend(LMCacheTier):
    name = "disk"

    @classmethod
    def lmcache_options(cls, options: LMCacheOptions, config: KVTierConfig) -> LMCacheOptions:
        return dataclasses.replace(options, disk_path=os.path.join(os.path.abspath(config.disk_path), ""),
                                   disk_gib=config.disk_gib)

    def __init__(self, runtime: LMCacheRuntime, config: KVTierConfig) -> None:
        os.makedirs(runtime.options.disk_path, exist_ok=True)
        rt = runtime
        super().__init__(rt, rt.lm.LocalDiskBackend(rt.engine_config, rt.loop, rt.cpu, "cpu", None, rt.metadata))

    def holdings(self) -> BackendHoldings:
        with self._store.disk_lock:
            keys = list(self._store.dict.keys())
        return BackendHoldings(self.runtime.own_keys(keys))

    def close(self) -> None:
        try:
            self._store.close()
        except Exception:  # closing must not raise from a finalizer path
            logger.debug("closing LMCache's disk backend failed", exc_info=True)
