"""The LMCache storage layer that every KV tier backend of one connector shares.

tierserve stores chunk records (chunk.py) in LMCache ``MemoryObj``s and lets
LMCache's own v1 backends keep them (dram.py, disk.py, redis.py). What they
share lives here:

* ``LMCacheOptions``: the LMCache engine settings, typed. The base sets the
  chunk size and the host buffer (``cpu_gib = dram_gib``); each tier's
  ``lmcache_options`` adds its part (DRAM: the buffer is also an LRU cache;
  disk: folder and size; Redis: URL with timeouts).
* ``LMCacheRuntime``: imports LMCache, builds its ``LMCacheEngineConfig`` and
  ``LMCacheMetadata``, runs the asyncio event loop its disk and Redis
  backends write on (a daemon thread), and owns the ``LocalCPUBackend``. That
  backend is built even without the DRAM tier (``local_cpu=False``): its
  allocator stages every disk and Redis transfer. ``allocate(nbytes)`` gives
  a record buffer (evicting DRAM LRU entries, never busy-waiting: when
  LMCache cannot make room, the store is skipped).
* ``ChunkBuffer``: one record, a uint8 ``MemoryObj`` of shape
  ``[1, 1, 1, nbytes]`` in format ``KV_2LTD``; its holder calls
  ``release()`` once. (LMCache's ``MemoryObj`` has no checksum field, and
  its byte-blob format ``BINARY_BUFFER`` is rejected by the disk backend, so
  the header with the checksum travels inside the tensor.)
* ``LMCacheTier``: the ``TierBackend`` over one of LMCache's local storage
  backends (DRAM and disk): contains / get_blocking / submit_put_task /
  remove, with exceptions counted as failures.

Keys are LMCache ``CacheEngineKey(model_tag, 1, 0, chunk_hash, dtype)`` with
``chunk_hash`` the chunk key read as a big-endian integer (``lmcache_key``),
so ``key.to_string()`` (the disk file name and the Redis key) is identical in
every process and machine; Python's salted ``hash`` is never involved.
``own_keys`` maps LMCache's index back to chunk keys of this model tag only.

What of LMCache runs here (torch CPU, no CUDA): its config, metadata, memory
allocator (``MixedMemoryAllocator``), the three backends and the Redis
connector all run on CPU tensors. Its ``lmcache.cuda_ops`` extension (linked
against libtorch_cuda) does not load, and with it go ``LMCacheEngine``'s GPU
connectors that copy between vLLM's paged KV and ``MemoryObj``s; tierserve
therefore does that copy itself (connector.py) and uses only the storage layer.

Usage reporting: LMCache sends anonymous usage telemetry unless
``LMCACHE_TRACK_USAGE=false``; ``LMCacheRuntime`` sets it (and
``DO_NOT_TRACK=1``) before importing LMCache. (Only ``LMCacheEngine`` and
LMCache's multiprocess server start the reporter; tierserve uses neither.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tierserve.cache.tiers.backend import TierBackend

logger = logging.getLogger(__name__)

#: Record allocations never busy-wait for space: when LMCache cannot evict enough, the store is skipped.
_ALLOC_NO_BUSY_LOOP = False
#: LMCache's default of ``blocking_timeout_secs`` (seconds a blocking remote read waits).
_LMCACHE_BLOCKING_TIMEOUT_S = 10


def _import_lmcache() -> SimpleNamespace:
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

    return SimpleNamespace(CacheEngineKey=CacheEngineKey, LMCacheEngineConfig=LMCacheEngineConfig,
                           MemoryFormat=MemoryFormat, LMCacheMetadata=LMCacheMetadata,
                           LocalCPUBackend=LocalCPUBackend, LocalDiskBackend=LocalDiskBackend,
                           RemoteBackend=RemoteBackend)


def lmcache_key(model_tag: str, dtype: torch.dtype, chunk_hash: bytes):
    """LMCache's key of a chunk: ``key.to_string()`` is ``<tag>@1@0@<sha256 hex>@<dtype>`` in every process."""
    from lmcache.utils import CacheEngineKey

    return CacheEngineKey(model_tag, 1, 0, int.from_bytes(chunk_hash, "big"), dtype)


@dataclass(frozen=True)
class LMCacheOptions:
    """The LMCache engine settings of one connector's tiers (module doc)."""

    chunk_tokens: int
    cpu_gib: float                  # the host buffer (``max_local_cpu_size``)
    hot_cache: bool = False         # ``local_cpu``: the buffer also keeps records as an LRU cache (DRAM tier)
    disk_path: str | None = None    # ``local_disk``: a folder, with a trailing separator
    disk_gib: float = 0.0           # ``max_local_disk_size``
    remote_url: str | None = None   # ``remote_url`` (a redis:// URL), stored with ``remote_serde="naive"``
    blocking_timeout_s: int = _LMCACHE_BLOCKING_TIMEOUT_S


class ChunkBuffer:
    """One chunk record in LMCache host memory (module doc); ``release()`` it once."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj  # an LMCache MemoryObj, uint8 [1, 1, 1, nbytes]

    def view(self) -> memoryview:
        """The record's bytes (writable, no copy)."""
        return memoryview(self.obj.tensor.view(-1).numpy())

    def release(self) -> None:
        self.obj.ref_count_down()


class LMCacheRuntime:
    """LMCache's config, metadata, event loop and CPU backend (the record allocator), shared by the tiers."""

    def __init__(self, options: LMCacheOptions, model_tag: str, kv_dtype: str,
                 kv_shape: tuple[int, int, int, int, int]):
        self.lm = _import_lmcache()
        self.options = options
        self.model_tag = model_tag
        self.dtype = getattr(torch, kv_dtype)
        o = options
        self.engine_config = self.lm.LMCacheEngineConfig.from_defaults(
            chunk_size=o.chunk_tokens, local_cpu=o.hot_cache, max_local_cpu_size=o.cpu_gib,
            local_disk=o.disk_path, max_local_disk_size=o.disk_gib, remote_url=o.remote_url,
            remote_serde="naive", blocking_timeout_secs=o.blocking_timeout_s,
            lmcache_instance_id=f"tierserve-{model_tag}-{os.getpid()}-{id(self)}")
        self.metadata = self.lm.LMCacheMetadata(model_name=model_tag, world_size=1, local_world_size=1,
                                                worker_id=0, local_worker_id=0, kv_dtype=self.dtype,
                                                kv_shape=kv_shape, chunk_size=o.chunk_tokens)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kv-tiers-lmcache", daemon=True)
        self._thread.start()
        self.cpu = self.lm.LocalCPUBackend(self.engine_config, self.metadata, "cpu")

    def key(self, chunk_key: bytes):
        """LMCache's key of a chunk of this model tag and KV dtype."""
        return lmcache_key(self.model_tag, self.dtype, chunk_key)

    def own_keys(self, lm_keys: Iterable) -> frozenset[bytes]:
        """The chunk keys of this model tag among LMCache keys (an index may hold other tags)."""
        return frozenset(k.chunk_hash.to_bytes(32, "big") for k in lm_keys if k.model_name == self.model_tag)

    def allocate(self, nbytes: int) -> ChunkBuffer | None:
        """A record buffer of ``nbytes`` from LMCache's allocator (evicting DRAM LRU), or None."""
        fmt = self.lm.MemoryFormat.KV_2LTD
        obj = self.cpu.allocate(torch.Size([1, 1, 1, nbytes]), torch.uint8, fmt, busy_loop=_ALLOC_NO_BUSY_LOOP)
        return None if obj is None else ChunkBuffer(obj)

    def close(self) -> None:
        """Close the CPU backend and stop the event loop (after every tier backend closed)."""
        try:
            self.cpu.close()
        except Exception:  # closing must not raise from a finalizer path
            logger.debug("closing LMCache's CPU backend failed", exc_info=True)
        loop = self.loop

        def stop() -> None:  # cancel LMCache's pending worker tasks, then let them unwind
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(stop)
        self._thread.join(timeout=5)


class LMCacheTier(TierBackend):
    """A ``TierBackend`` over one of LMCache's local storage backends (DRAM, disk); see backend.py."""

    def __init__(self, runtime: LMCacheRuntime, store) -> None:
        super().__init__()
        self.runtime = runtime
        self._store = store  # an LMCache StorageBackendInterface
        self._fail_lock = threading.Lock()  # failures are counted on the engine thread and LMCache's writers

    def _fail(self, what: str, key: bytes, exc: BaseException) -> None:
        with self._fail_lock:
            self.failures += 1
        logger.warning("KV tier %s: %s of chunk %s failed (%s)", self.name, what, key.hex()[:16], exc)

    def contains(self, key: bytes) -> bool:
        try:
            return bool(self._store.contains(self.runtime.key(key)))
        except Exception as exc:
            self._fail("contains", key, exc)
            return False

    def get(self, key: bytes) -> ChunkBuffer | None:
        try:
            obj = self._store.get_blocking(self.runtime.key(key))
        except Exception as exc:  # an unreadable file: a miss in this tier
            self._fail("reading", key, exc)
            return None
        return None if obj is None else ChunkBuffer(obj)

    def put(self, key: bytes, record: ChunkBuffer) -> bool:
        try:
            lm_key = self.runtime.key(key)
            if self._store.exists_in_put_tasks(lm_key):  # a write of this key is in flight: LMCache skips it
                return False
            self._store.submit_put_task(lm_key, record.obj)
        except Exception as exc:
            self._fail("storing", key, exc)
            return False
        return True

    def remove(self, key: bytes) -> None:
        try:
            self._store.remove(self.runtime.key(key))
        except Exception as exc:  # best effort: a failed removal only costs another check
            logger.warning("KV tier %s: could not remove chunk %s (%s)", self.name, key.hex()[:16], exc)
