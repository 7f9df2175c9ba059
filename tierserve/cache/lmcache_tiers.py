"""LMCache's storage backends as tierserve's DRAM, disk and Redis KV tiers.

tierserve stores chunk records (kv_tier_chunk.py) in LMCache ``MemoryObj``s
and lets LMCache's own v1 backends keep them:

* ``dram``  -> ``LocalCPUBackend`` (``local_cpu=True``): an LRU hot cache in
  a host buffer of ``dram_gib``. The same backend is built even without the
  "dram" tier (``local_cpu=False``): it is LMCache's allocator that stages
  every disk and Redis transfer.
* ``disk``  -> ``LocalDiskBackend``: one file per chunk under ``disk_path``,
  LRU within ``disk_gib``, written asynchronously on LMCache's event loop.
  Its index lives in the process, so a disk tier serves the process that
  wrote it (a restarted or second process starts empty); sharing across
  processes goes through Redis.
* ``redis`` -> ``RemoteBackend`` with LMCache's ``RedisConnector``
  (``remote_serde="naive"``): a key per chunk ``<key>kv_bytes`` plus
  ``<key>metadata``, shared by every replica that points at the same server.

Keys are LMCache ``CacheEngineKey(model_tag, 1, 0, chunk_hash, dtype)`` with
``chunk_hash`` the chunk's SHA-256 block hash read as a big-endian integer,
so ``key.to_string()`` (the file name and the Redis key) is identical in
every process and machine; Python's salted ``hash`` is never involved.

What of LMCache runs here (torch 2.13 CPU, no CUDA): its config, metadata,
memory allocator (``MixedMemoryAllocator``), these three backends and the
Redis connector all run on CPU tensors. Its ``lmcache.cuda_ops`` extension
(linked against libtorch_cuda) does not load, and with it go
``LMCacheEngine``'s GPU connectors that copy between vLLM's paged KV and
``MemoryObj``s; tierserve therefore does that copy itself on CPU
(lmcache_connector.py) and uses only the storage layer. The chunk records are
uint8 tensors of shape ``[1, 1, 1, nbytes]`` in format ``KV_2LTD``: LMCache's
``MemoryObj`` has no checksum field, and its byte-blob format
(``BINARY_BUFFER``) is rejected by the disk backend, so the header with the
checksum travels inside the tensor.

Usage reporting: LMCache sends anonymous usage telemetry unless
``LMCACHE_TRACK_USAGE=false``; ``LMCacheTiers`` sets it (and
``DO_NOT_TRACK=1``) before importing LMCache. (Only ``LMCacheEngine`` and
LMCache's multiprocess server start the reporter; tierserve uses neither.)

Redis failure handling (``_RedisGuard``): every Redis call runs with the
socket and connect timeout ``redis_timeout_s`` (redis-py URL options); an
exception, a timeout, or a rise of LMCache's own failed-get/put counters
counts one failure, logs a warning, and opens a circuit breaker: the tier is
skipped for ``redis_retry_s`` seconds, so lookups fall back to the tiers
above and to recompute. Nothing Redis does fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from tierserve.cache.kv_tier_config import KVTierConfig

logger = logging.getLogger(__name__)

#: Record allocations never busy-wait for space: when LMCache cannot evict enough, the store is skipped.
_ALLOC_NO_BUSY_LOOP = False


def _import_lmcache():
    """Import LMCache's storage layer with its usage reporting disabled."""
    os.environ["LMCACHE_TRACK_USAGE"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # its INFO lines per backend; tierserve logs tier events
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend

    return dict(CacheEngineKey=CacheEngineKey, LMCacheEngineConfig=LMCacheEngineConfig,
                MemoryFormat=MemoryFormat, LMCacheMetadata=LMCacheMetadata,
                LocalCPUBackend=LocalCPUBackend, LocalDiskBackend=LocalDiskBackend,
                RemoteBackend=RemoteBackend)


def _redis_url_with_timeouts(url: str, timeout_s: float) -> str:
    sep = "&" if "?" in url else "?"
    extra = [f"{k}={timeout_s}" for k in ("socket_timeout", "socket_connect_timeout") if k not in url]
    return url + (sep + "&".join(extra) if extra else "")


def lmcache_key(model_tag: str, dtype: torch.dtype, chunk_hash: bytes):
    """LMCache's key of a chunk: ``key.to_string()`` is ``<tag>@1@0@<sha256 hex>@<dtype>`` in every process."""
    from lmcache.utils import CacheEngineKey

    return CacheEngineKey(model_tag, 1, 0, int.from_bytes(chunk_hash, "big"), dtype)


@dataclass
class TierCounters:
    """Per-tier outcome counts kept by LMCacheTiers (read by the connector's stats)."""

    failures: int = 0


class _RedisGuard:
    """Circuit breaker over LMCache's RemoteBackend (module doc)."""

    def __init__(self, backend, timeout_s: float, retry_s: float, counters: TierCounters):
        self.backend, self.timeout_s, self.retry_s, self.counters = backend, timeout_s, retry_s, counters
        self._open_until = 0.0
        self._seen_failed = 0

    def available(self) -> bool:
        self._check_lmcache_counters()
        return time.monotonic() >= self._open_until and self.backend.connection is not None

    def fail(self, what: str, exc: BaseException | str) -> None:
        self.counters.failures += 1
        self._open_until = time.monotonic() + self.retry_s
        logger.warning("KV tier redis: %s failed (%s); skipping redis for %.1f s", what, exc, self.retry_s)

    def contains(self, key) -> bool:
        if not self.available():
            return False
        conn = self.backend.connection
        try:
            fut = asyncio.run_coroutine_threadsafe(conn.exists(key), self.backend.loop)
            return bool(fut.result(self.timeout_s * 2))
        except Exception as exc:  # timeout, refused connection, protocol error
            self.fail("exists", exc)
            return False

    def get(self, key):
        obj = self.backend.get_blocking(key)
        self._check_lmcache_counters()
        return obj

    def _check_lmcache_counters(self) -> None:
        """LMCache's RemoteBackend swallows get/put errors and counts them: turn new ones into failures."""
        failed = self.backend.get_blocking_failed_count + self.backend.put_failed_count
        if failed > self._seen_failed:
            new, self._seen_failed = failed - self._seen_failed, failed
            self.fail("get/put", f"{new} failed LMCache remote call(s)")
            self.counters.failures += new - 1


class LMCacheTiers:
    """The configured tiers over LMCache backends: contains / get / put of chunk records by key.

    ``get`` returns an LMCache MemoryObj (the caller must ``ref_count_down()`` it) or None.
    """

    def __init__(self, config: KVTierConfig, model_tag: str, kv_dtype: str, chunk_tokens: int,
                 kv_shape: tuple[int, int, int, int, int]):
        lm = _import_lmcache()
        self._lm = lm
        self.config = config
        self.model_tag = model_tag
        self._dtype = getattr(torch, kv_dtype)
        self.counters = {t: TierCounters() for t in config.tiers}
        redis_url = None
        if "redis" in config.tiers:
            redis_url = _redis_url_with_timeouts(config.redis_url, config.redis_timeout_s)
        disk_path = None
        if "disk" in config.tiers:
            disk_path = os.path.join(os.path.abspath(config.disk_path), "")
            os.makedirs(disk_path, exist_ok=True)
        cfg = lm["LMCacheEngineConfig"].from_defaults(
            chunk_size=chunk_tokens, local_cpu="dram" in config.tiers, max_local_cpu_size=config.dram_gib,
            local_disk=disk_path, max_local_disk_size=config.disk_gib if disk_path else 0.0,
            remote_url=redis_url, remote_serde="naive",
            blocking_timeout_secs=max(1, int(-(-config.redis_timeout_s * 2 // 1))),
            lmcache_instance_id=f"tierserve-{model_tag}-{os.getpid()}-{id(self)}")
        meta = lm["LMCacheMetadata"](model_name=model_tag, world_size=1, local_world_size=1, worker_id=0,
                                     local_worker_id=0, kv_dtype=self._dtype, kv_shape=kv_shape,
                                     chunk_size=chunk_tokens)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kv-tiers-lmcache", daemon=True)
        self._thread.start()
        self.cpu = lm["LocalCPUBackend"](cfg, meta, "cpu")
        self.backends: dict[str, object] = {}
        if "dram" in config.tiers:
            self.backends["dram"] = self.cpu
        if disk_path:
            self.backends["disk"] = lm["LocalDiskBackend"](cfg, self._loop, self.cpu, "cpu", None, meta)
        self._redis: _RedisGuard | None = None
        self._redis_url, self._redis_sync = redis_url, None
        if redis_url:
            remote = lm["RemoteBackend"](cfg, meta, self._loop, self.cpu, "cpu")
            self.backends["redis"] = remote
            self._redis = _RedisGuard(remote, config.redis_timeout_s, config.redis_retry_s,
                                      self.counters["redis"])
            if remote.connection is None:
                self._redis.fail("connect", redis_url)

    # ------------------------------------------------------------------ keys
    def key(self, chunk_hash: bytes):
        return lmcache_key(self.model_tag, self._dtype, chunk_hash)

    # ------------------------------------------------------------ operations
    def allocate(self, nbytes: int):
        """A uint8 MemoryObj of ``nbytes`` from LMCache's allocator (evicting DRAM LRU), or None."""
        fmt = self._lm["MemoryFormat"].KV_2LTD
        return self.cpu.allocate(torch.Size([1, 1, 1, nbytes]), torch.uint8, fmt, busy_loop=_ALLOC_NO_BUSY_LOOP)

    def contains(self, tier: str, key) -> bool:
        if tier == "redis":
            return self._redis.contains(key)
        return self.backends[tier].contains(key)

    def get(self, tier: str, key):
        if tier == "redis":
            return self._redis.get(key) if self._redis.contains(key) else None
        return self.backends[tier].get_blocking(key)

    def put(self, tier: str, key, obj) -> bool:
        """Hand ``obj`` to the tier (disk and Redis finish asynchronously); False if Redis is skipped."""
        if tier == "redis":
            if not self._redis.available():
                return False
            try:
                self.backends["redis"].submit_put_task(key, obj)
            except Exception as exc:
                self._redis.fail("put", exc)
                return False
            return True
        self.backends[tier].submit_put_task(key, obj)
        return True

    def remove(self, tier: str, key) -> None:
        """Drop a chunk (one that failed its checksum, so it is not read again).

        LMCache 0.5.6's RedisConnector does not implement ``remove_sync``, so for
        Redis the chunk's two keys (``<key>metadata``, ``<key>kv_bytes``, the
        connector's layout) are deleted with a plain redis-py client.
        """
        try:
            if tier == "redis":
                import redis

                if self._redis_sync is None:
                    self._redis_sync = redis.Redis.from_url(self._redis_url)
                name = key.to_string()
                self._redis_sync.delete(name + "metadata", name + "kv_bytes")
                return
            self.backends[tier].remove(key)
        except Exception as exc:  # best effort: a failed removal only costs another check
            logger.warning("KV tier %s: could not remove a corrupt chunk (%s)", tier, exc)

    def redis_available(self) -> bool:
        return self._redis is not None and self._redis.available()

    def close(self) -> None:
        """Close the disk and CPU backends and stop the event loop.

        The Redis backend is not closed: LMCache 0.5.6's ``RedisConnector.close``
        waits, on the event loop thread, for a job that needs that same loop, and
        never returns. Stopping the loop leaves its sockets to the garbage collector.
        """
        local = [b for t, b in self.backends.items() if t != "redis"] + [self.cpu]
        for backend in {id(b): b for b in local}.values():
            try:
                backend.close()
            except Exception:  # closing must not raise from a finalizer path
                logger.debug("closing an LMCache backend failed", exc_info=True)
        loop = self._loop

        def stop() -> None:  # cancel LMCache's pending worker tasks, then let them unwind
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(stop)
        self._thread.join(timeout=5)
