"""The Redis tier: LMCache's ``RemoteBackend`` with its ``RedisConnector``, shared by every replica.

Layout (LMCache's, ``remote_serde="naive"``): a chunk is two Redis keys,
``<LMCache key>kv_bytes`` and ``<LMCache key>metadata``, shared by every
replica and process that points at the same server.

Failure handling (the tier owns it; nothing Redis does fails a request):

* every Redis call runs with the socket and connect timeout
  ``redis_timeout_s`` (redis-py URL options added to ``redis_url``); an
  EXISTS waits at most ``2 * redis_timeout_s``, a blocking read at most
  ``max(1, ceil(2 * redis_timeout_s))`` s (LMCache's ``blocking_timeout_secs``);
* an exception, a timeout, a failed initial connection, or a rise of
  LMCache's own failed-get/put counters (its RemoteBackend swallows those
  errors and counts them) counts one failure each, logs a warning, and opens a
  circuit breaker: the tier answers as a miss without calling Redis for
  ``redis_retry_s`` seconds, so a dead Redis costs one timeout per
  ``redis_retry_s``, not one per chunk, and lookups fall back to the tiers
  above and to recompute.

Event log (the tier is shared, so it cannot list what it holds; holdings are
events instead): every call that reached Redis notes what it learned about a
key: True for a key found by ``contains``/``get`` or handed to ``put``; False
for a key ``contains``/``get`` did not find or that ``remove`` deleted.
``holdings()`` drains the net last event per key since its previous call
(thread safe: the engine thread notes, the cache reporter drains). Calls
skipped by the open breaker, or that failed, note nothing.

``remove``: LMCache 0.5.6's RedisConnector does not implement ``remove_sync``,
so the chunk's two keys are deleted with a plain redis-py client (same URL and
timeouts). ``close`` does not close LMCache's backend: its
``RedisConnector.close`` waits, on the event loop thread, for a job that needs
that same loop, and never returns; stopping the loop (the runtime's close)
leaves its sockets to the garbage collector.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time

from tierserve.cache.tiers.backend import BackendHoldings, TierBackend
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.lmcache_runtime import ChunkBuffer, LMCacheOptions, LMCacheRuntime

logger = logging.getLogger(__name__)


def redis_url_with_timeouts(url: str, timeout_s: float) -> str:
    """``url`` with ``socket_timeout`` and ``socket_connect_timeout`` set to ``timeout_s`` unless it has them."""
    sep = "&" if "?" in url else "?"
    extra = [f"{k}={timeout_s}" for k in ("socket_timeout", "socket_connect_timeout") if k not in url]
    return url + (sep + "&".join(extra) if extra else "")


class RedisBackend(TierBackend):
    name = "redis"

    @classmethod
    def lmcache_options(cls, options: LMCacheOptions, config: KVTierConfig) -> LMCacheOptions:
        return dataclasses.replace(options, remote_url=redis_url_with_timeouts(config.redis_url, config.redis_timeout_s),
                                   blocking_timeout_s=max(1, math.ceil(config.redis_timeout_s * 2)))

    def __init__(self, runtime: LMCacheRuntime, config: KVTierConfig) -> None:
        super().__init__()
        self.runtime = runtime
        self.timeout_s, self.retry_s = config.redis_timeout_s, config.redis_retry_s
        self._url = runtime.options.remote_url
        rt = runtime
        self._remote = rt.lm.RemoteBackend(rt.engine_config, rt.metadata, rt.loop, rt.cpu, "cpu")
        self._open_until = 0.0
        self._seen_failed = 0
        self._seen_put_failed = 0
        self._client = None  # redis-py client for remove(), made on first use
        self._events: dict[bytes, bool] = {}  # chunk key -> held / missing, the last event wins
        self._lock = threading.Lock()
        if self._remote.connection is None:
            self._fail("connect", self._url)

    # ------------------------------------------------------------ breaker
    def available(self) -> bool:
        """Redis is connected and the breaker is closed."""
        self._check_lmcache_counters()
        return time.monotonic() >= self._open_until and self._remote.connection is not None

    def _fail(self, what: str, exc: BaseException | str, count: int = 1) -> None:
        self.failures += count
        self._open_until = time.monotonic() + self.retry_s
        logger.warning("KV tier redis: %s failed (%s); skipping redis for %.1f s", what, exc, self.retry_s)

    def _check_lmcache_counters(self) -> None:
        """LMCache's RemoteBackend swallows get/put errors and counts them: turn new ones into failures."""
        failed = self._remote.get_blocking_failed_count + self._remote.put_failed_count
        if failed > self._seen_failed:
            new, self._seen_failed = failed - self._seen_failed, failed
            put_failed = self._remote.put_failed_count
            self.lost_puts += put_failed - self._seen_put_failed  # accepted puts whose write failed (backend.py)
            self._seen_put_failed = put_failed
            self._fail("get/put", f"{new} failed LMCache remote call(s)", count=new)

    def _exists(self, key: bytes) -> bool | None:
        """EXISTS through LMCache's connection; None when skipped (breaker open) or failed."""
        if not self.available():
            return None
        try:
            fut = asyncio.run_coroutine_threadsafe(self._remote.connection.exists(self.runtime.key(key)),
                                                   self.runtime.loop)
            return bool(fut.result(self.timeout_s * 2))
        except Exception as exc:  # timeout, refused connection, protocol error
            self._fail("exists", exc)
            return None

    # ------------------------------------------------------------ contract
    def contains(self, key: bytes) -> bool:
        found = self._exists(key)
        if found is not None:
            self._note(key, found)
        return bool(found)

    def get(self, key: bytes) -> ChunkBuffer | None:
        found = self._exists(key)
        if not found:
            if found is False:
                self._note(key, False)
            return None
        try:
            obj = self._remote.get_blocking(self.runtime.key(key))
        except Exception as exc:
            self._fail("get", exc)
            return None
        if obj is None:
            if self.available():  # a miss, not a failure (a failure raised LMCache's counters)
                self._note(key, False)
            return None
        self._note(key, True)
        return ChunkBuffer(obj)

    def put(self, key: bytes, record: ChunkBuffer) -> bool:
        if not self.available():
            return False
        try:
            lm_key = self.runtime.key(key)
            if self._remote.exists_in_put_tasks(lm_key):  # a write of this key is in flight: LMCache skips it
                return False
            self._remote.submit_put_task(lm_key, record.obj)
        except Exception as exc:
            self._fail("put", exc)
            return False
        self._note(key, True)
        return True

    def remove(self, key: bytes) -> None:
        """Delete the chunk's two Redis keys (module doc); best effort."""
        try:
            import redis

            if self._client is None:
                self._client = redis.Redis.from_url(self._url)
            name = self.runtime.key(key).to_string()
            self._client.delete(name + "metadata", name + "kv_bytes")
        except Exception as exc:  # best effort: a failed removal only costs another check
            logger.warning("KV tier redis: could not remove chunk %s (%s)", key.hex()[:16], exc)
            return
        self._note(key, False)

    def holdings(self) -> BackendHoldings:
        """No key list (the tier is shared); the net last event per key since the last call, drained."""
        with self._lock:
            events, self._events = self._events, {}
        return BackendHoldings(None, events)

    def close(self) -> None:
        """Closes only the redis-py client of ``remove`` (module doc: LMCache's own close never returns)."""
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing must not raise from a finalizer path
                logger.debug("closing the redis client failed", exc_info=True)

    def _note(self, key: bytes, held: bool) -> None:
        with self._lock:
            self._events.pop(key, None)
            self._events[key] = held
