"""The disk tier: LMCache's ``LocalDiskBackend``, one file per chunk record under ``disk_path``.

Files are named ``<LMCache key>.pt`` (lmcache_runtime.py ``lmcache_key``),
kept LRU within ``disk_gib``, and written asynchronously on LMCache's event
loop, so ``contains`` turns true once a write lands. The index lives in the
process: a disk tier serves the process that wrote it (a restarted or second
process starts empty); sharing across processes goes through Redis. Holdings:
that index (``LocalDiskBackend.dict``, read under its lock).

Capacity: a put reserves the record's size in LMCache's ``current_cache_size``
and evicts the least recently used records until it fits ``disk_gib`` (unlike
the CPU backend's, the disk backend's ``get_blocking`` marks a read record as
used, so a chunk read from disk outlives older unread ones). Tested:
tests/test_kv_tiers_lru.py.

Two gaps of LMCache 0.5.6 this tier closes (tests/test_kv_tiers_store_failures.py):

* A write that fails on the event loop (the folder removed or unwritable, a
  full disk: an ``OSError`` from ``write_file``) raises into a future nobody
  reads. LMCache would keep the record's DRAM buffer referenced, its size
  reserved and its key marked "put in progress" forever (every later put of
  that key silently skipped), and nothing would count it. Here the write is
  wrapped: on an ``OSError`` the buffer reference, the reserved size, the
  usage and the in-progress mark are undone, a partial file is removed, and
  the failure is counted (``failures``, so ``KVTierStats.failures["disk"]``
  and ``tierserve:kv_tier_failures_total``, and ``lost_puts``) and logged. The next put of the
  key is tried again.
* ``remove`` (LMCache's forced remove) frees the file but not the reserved
  size, so every removed record would shrink the tier for good; the size is
  given back here.
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
        store = self._store
        self._lmcache_save = store.async_save_bytes_to_disk
        store.async_save_bytes_to_disk = self._save_or_undo  # submit_put_task looks it up on the instance

    def _save_or_undo(self, key, memory_obj, on_complete_callback=None) -> None:
        """LMCache's asynchronous write of one record; a failed write is undone and counted (module doc)."""
        try:
            self._lmcache_save(key=key, memory_obj=memory_obj, on_complete_callback=on_complete_callback)
        except OSError as exc:  # raised by write_file, before LMCache released the buffer or indexed the key
            store = self._store
            memory_obj.ref_count_down()
            with store.disk_lock:
                store.current_cache_size -= memory_obj.get_physical_size()
                store.usage -= len(memory_obj.byte_array)
            store.disk_worker.remove_put_task(key)
            try:
                os.remove(store._key_to_path(key))
            except OSError:  # no partial file (the usual case: the folder is gone or unwritable)
                pass
            with self._fail_lock:
                self.lost_puts += 1
            self._fail("writing", key.chunk_hash.to_bytes(32, "big"), exc)

    def remove(self, key: bytes) -> None:
        """Drop the record and its file, giving back its reserved size (module doc); best effort."""
        store, lm_key = self._store, self.runtime.key(key)
        try:
            with store.disk_lock:  # LMCache's unforced remove takes no lock: index, size and file change together
                meta = store.dict.get(lm_key)
                if meta is None:
                    return
                store.current_cache_size -= meta.size
                store.remove(lm_key, force=False)
                store.cache_policy.update_on_force_evict(lm_key)
        except Exception as exc:  # best effort: a failed removal only costs another check
            logger.warning("KV tier disk: could not remove chunk %s (%s)", key.hex()[:16], exc)

    def holdings(self) -> BackendHoldings:
        with self._store.disk_lock:
            keys = list(self._store.dict.keys())
        return BackendHoldings(self.runtime.own_keys(keys))

    def close(self) -> None:
        try:
            self._store.close()
        except Exception:  # closing must not raise from a finalizer path
            logger.debug("closing LMCache's disk backend failed", exc_info=True)
