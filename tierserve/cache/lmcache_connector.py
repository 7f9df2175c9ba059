"""KVTierConnector: moves whole KV chunks between the engine's paged KV and the lower tiers.

Chunks. With ``C = chunk_blocks * block_size`` tokens per chunk, chunk ``j``
of a request covers tokens ``[j*C, (j+1)*C)`` (only whole chunks are ever
stored). Its key is the chained SHA-256 block hash (prefix_hash.py) of its
last block, so equal keys mean equal token prefixes, in any process. Its
record (kv_tier_chunk.py) carries the payload ``[L, 2, C, kv_heads, head_dim]``
with a BLAKE3 checksum; the tiers are LMCache backends (lmcache_tiers.py).

Lookup before prefill (``match``, called by the scheduler when it admits a
request): with ``h`` tokens already served by the device prefix cache and
``cap = ((num_tokens - 1) // block_size) * block_size`` (at least one token
is always left to compute), walk chunks ``j = h // C, h // C + 1, ...`` while
``j*C < cap`` and the chunk is whole in the known tokens; for each, try the
tiers in order dram > disk > redis and take the first record that passes
``verify_record``. A record that fails is counted (``corrupt``), removed from
that tier, and the next tier is tried; a chunk no tier serves ends the walk.
The request gets ``e = min(end of last chunk, cap) - h`` extra tokens (0 if
negative): the longest chunk-aligned prefix that hits, minus what the device
cache had. Records are fetched and verified here, at schedule time, so a
corrupt chunk can only shorten the hit, never fail a step. A hit from disk
or Redis is also put into DRAM (when DRAM is a tier).

Load (``apply_loads``, by the engine after ``schedule`` and before the
forward): the scheduler has allocated blocks for the ``e`` tokens and marked
them computed (``commit``); the verified payload slices are copied into those
blocks' K and V pages of every layer (``index_copy_``). The blocks are
registered in the device prefix cache by the scheduler as usual.

Store (``store_request``): after the step in which a request's prompt was
fully computed (``after_step``) and when it finishes, every whole chunk of
its computed tokens is gathered from its blocks into a record and put into
every tier that does not have it yet (each tier is asked: for Redis one
EXISTS call per chunk, skipped while its circuit breaker is open). Stores are
synchronous copies into LMCache buffers; disk and Redis writes then finish on
LMCache's event loop.

Holdings for the router (``held_chunks`` and ``drain_redis_events``, read by
the worker's cache reporter, server/cache_reporter.py ``TierMirror``): the
chunk keys the DRAM and disk tiers hold now, read from LMCache's own indexes
(``LocalCPUBackend.get_keys()``, ``LocalDiskBackend.dict``), so LRU
evictions are seen at the next report; and, for the shared Redis, the net
last event per key since the last drain: True for a key this connector put
into Redis, found there when storing, or loaded from it; False for a key a
lookup did not find (or found corrupt) while Redis was reachable.

Stats (``stats()`` -> KVTierStats): per tier the chunks and tokens served,
bytes loaded and stored, checksum failures, Redis failures; total seconds
spent fetching + verifying + copying loaded chunks.

Tests: tests/test_kv_tiers.py (logits after a load from each tier equal a
full recompute; corrupted and truncated disk files are recomputed; Redis
killed mid-run), tests/test_kv_tiers_processes.py (keys across
PYTHONHASHSEED values; a second process served from Redis).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from tierserve.kernels.kv_pages import LayerKV
from tierserve.kernels.kv_spec import KVSpec
from tierserve.cache.kv_tier_chunk import CorruptChunkError, record_size, verify_record, write_record
from tierserve.cache.kv_tier_config import KVTierConfig
from tierserve.cache.kv_tier_stats import KVTierStats
from tierserve.cache.prefix_hash import hash_block

logger = logging.getLogger(__name__)


def chunk_keys(token_ids: list[int], block_size: int, chunk_blocks: int) -> list[bytes]:
    """Keys of the whole chunks of ``token_ids``: the chained block hash of each chunk's last block."""
    keys, parent = [], None
    num_blocks = (len(token_ids) // (block_size * chunk_blocks)) * chunk_blocks
    for b in range(num_blocks):
        parent = hash_block(parent, token_ids[b * block_size:(b + 1) * block_size], ())
        if (b + 1) % chunk_blocks == 0:
            keys.append(parent)
    return keys


@dataclass
class _Fetched:
    start: int                       # first token the hit covers (the device hit h)
    end: int                         # h + e
    chunks: list[tuple[int, torch.Tensor]]  # (chunk index, payload [L, 2, C, H, D])


class KVTierConnector:
    def __init__(self, config: KVTierConfig, spec: KVSpec, model_tag: str):
        from tierserve.cache.lmcache_tiers import LMCacheTiers

        self.config = config
        self.spec = spec
        self.chunk_blocks = config.chunk_blocks
        self.chunk_tokens = config.chunk_blocks * spec.block_size
        self.shape = (spec.num_layers, 2, self.chunk_tokens, spec.num_kv_heads, spec.head_dim)
        self.payload_bytes = self.chunk_tokens * spec.token_bytes_per_layer * spec.num_layers
        self._dtype = getattr(torch, spec.dtype)
        self.tiers = LMCacheTiers(config, model_tag, spec.dtype, self.chunk_tokens,
                                  (spec.num_layers, 2, self.chunk_tokens, spec.num_kv_heads, spec.head_dim))
        self._fetched: dict[str, _Fetched] = {}
        self._pending: list[tuple[list[int], list[tuple[int, torch.Tensor]], int]] = []
        self._hashes: dict[str, list[bytes]] = {}
        names = config.tiers
        self._hits = dict.fromkeys(names, 0)
        self._hit_tokens = dict.fromkeys(names, 0)
        self._loaded = dict.fromkeys(names, 0)
        self._stored = dict.fromkeys(names, 0)
        self._corrupt = dict.fromkeys(names, 0)
        self._lookups = 0
        self._load_s = 0.0
        self._redis_events: dict[bytes, bool] = {}  # chunk key -> held (True) / missing (False), last wins
        self._redis_lock = threading.Lock()  # the engine thread writes, the reporter drains

    # ------------------------------------------------------------- keys
    def _request_keys(self, req, num_chunks: int) -> list[bytes]:
        keys = self._hashes.get(req.request_id)
        if keys is None or len(keys) < num_chunks:
            keys = chunk_keys(req.token_ids(0, num_chunks * self.chunk_tokens), self.spec.block_size,
                              self.chunk_blocks)
            self._hashes[req.request_id] = keys
        return keys

    # ----------------------------------------------------------- lookup
    def match(self, req, num_device_hit: int) -> int:
        """Extra tokens after ``num_device_hit`` that the tiers can serve (fetched and verified now).

        A request retried at the head of the queue (its blocks did not fit) keeps what it fetched while its
        device hit is unchanged: the chunks are not read and verified again on every step it waits."""
        prev = self._fetched.pop(req.request_id, None)
        if prev is not None and prev.start == num_device_hit:
            self._fetched[req.request_id] = prev
            return prev.end - prev.start
        bs, C = self.spec.block_size, self.chunk_tokens
        cap = ((req.num_tokens - 1) // bs) * bs
        first = num_device_hit // C
        if first * C >= cap:
            return 0
        self._lookups += 1
        t0 = time.perf_counter()
        max_chunks = min(-(-cap // C), req.num_tokens // C)
        keys = self._request_keys(req, max_chunks)
        chunks: list[tuple[int, torch.Tensor]] = []
        for j in range(first, max_chunks):
            payload = self._fetch(keys[j])
            if payload is None:
                break
            chunks.append((j, payload))
        end = min((first + len(chunks)) * C, cap)
        self._load_s += time.perf_counter() - t0
        if end <= num_device_hit:
            return 0
        self._fetched[req.request_id] = _Fetched(num_device_hit, end, chunks)
        return end - num_device_hit

    def _fetch(self, key: bytes) -> torch.Tensor | None:
        lm_key = self.tiers.key(key)
        for tier in self.config.tiers:
            try:
                obj = self.tiers.get(tier, lm_key)
            except Exception as exc:  # an unreadable file or a broken connection: a miss in this tier
                self.tiers.counters[tier].failures += 1
                logger.warning("KV tier %s: reading chunk %s failed (%s)", tier, key.hex()[:16], exc)
                continue
            if obj is None:
                if tier == "redis" and self.tiers.redis_available():
                    self._note_redis(key, False)
                continue
            try:
                raw = obj.tensor.view(-1).numpy()
                payload = verify_record(memoryview(raw), key, self.spec.dtype, self.shape)
                out = torch.empty(self.payload_bytes, dtype=torch.uint8)
                out.numpy()[:] = payload
                if tier != "dram" and "dram" in self.config.tiers:
                    self.tiers.put("dram", lm_key, obj)
            except CorruptChunkError as exc:
                self._corrupt[tier] += 1
                logger.warning("KV tier %s: chunk %s rejected (%s); recomputing it", tier, key.hex()[:16], exc.reason)
                obj.ref_count_down()
                self.tiers.remove(tier, lm_key)
                if tier == "redis":
                    self._note_redis(key, False)
                continue
            obj.ref_count_down()
            if tier == "redis":
                self._note_redis(key, True)
            self._hits[tier] += 1
            self._hit_tokens[tier] += self.chunk_tokens
            self._loaded[tier] += self.payload_bytes
            return out.view(self._dtype).view(self.shape)
        return None

    def commit(self, req, num_device_hit: int, num_external: int) -> None:
        """The scheduler allocated ``req``'s blocks and marked the tier tokens computed: queue the copy."""
        f = self._fetched.pop(req.request_id, None)
        if num_external <= 0:
            return
        if f is None or f.start != num_device_hit or f.end != num_device_hit + num_external:
            raise ValueError(f"request {req.request_id}: commit does not match the last match()")
        bs = self.spec.block_size
        blocks = req.block_ids[f.start // bs:f.end // bs]
        self._pending.append((blocks, f.chunks, f.start))

    def apply_loads(self, kv_caches: list[LayerKV]) -> None:
        """Copy every committed chunk slice into its blocks (before the step's forward)."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        bs, C = self.spec.block_size, self.chunk_tokens
        for blocks, chunks, start in self._pending:
            pos = start
            for j, payload in chunks:
                lo, hi = max(pos, j * C), min((j + 1) * C, start + len(blocks) * bs)
                if hi <= lo:
                    continue
                dst = torch.tensor(blocks[(lo - start) // bs:(hi - start) // bs], dtype=torch.long)
                part = payload[:, :, lo - j * C:hi - j * C]
                nb = dst.numel()
                for layer, cache in enumerate(kv_caches):
                    cache.k.index_copy_(0, dst, part[layer, 0].reshape(nb, bs, *cache.k.shape[2:]))
                    cache.v.index_copy_(0, dst, part[layer, 1].reshape(nb, bs, *cache.v.shape[2:]))
                pos = hi
        self._pending.clear()
        self._load_s += time.perf_counter() - t0

    def forget(self, request_id: str) -> None:
        self._fetched.pop(request_id, None)
        self._hashes.pop(request_id, None)

    # ------------------------------------------------------------ store
    def after_step(self, scheduled, requests: dict, kv_caches: list[LayerKV]) -> None:
        """Store the prompt chunks of every request whose prompt finished computing this step."""
        for sr in scheduled:
            req = requests.get(sr.request_id)
            if req is None:
                continue
            end = sr.start + sr.num_tokens
            if sr.start < req.num_prompt_tokens <= end:
                self.store_request(req, kv_caches, req.num_prompt_tokens)

    def store_request(self, req, kv_caches: list[LayerKV], num_tokens: int | None = None) -> None:
        """Put every whole chunk of ``req``'s first ``num_tokens`` computed tokens into the tiers."""
        n = min(req.num_computed_tokens if num_tokens is None else num_tokens, req.num_computed_tokens)
        num_chunks = n // self.chunk_tokens
        if num_chunks == 0:
            return
        keys = self._request_keys(req, num_chunks)
        for j in range(num_chunks):
            try:
                self._store_chunk(keys[j], req.block_ids[j * self.chunk_blocks:(j + 1) * self.chunk_blocks],
                                  kv_caches)
            except Exception:  # a tier's store failing must never fail the request
                logger.exception("KV tier store of chunk %s failed", keys[j].hex()[:16])

    def _store_chunk(self, key: bytes, blocks: list[int], kv_caches: list[LayerKV]) -> None:
        lm_key = self.tiers.key(key)
        todo = [t for t in self.config.tiers if not self.tiers.contains(t, lm_key)]
        if "redis" in self.config.tiers and "redis" not in todo:
            self._note_redis(key, True)
        if not todo:
            return
        obj = self.tiers.allocate(record_size(self.payload_bytes))
        if obj is None:
            logger.warning("KV tiers: no DRAM buffer space for a %d-byte chunk; not stored", self.payload_bytes)
            return
        try:
            idx = torch.tensor(blocks, dtype=torch.long)
            payload = torch.stack([torch.stack([c.k.index_select(0, idx), c.v.index_select(0, idx)])
                                   for c in kv_caches])
            raw = payload.contiguous().view(torch.uint8).view(-1).numpy()
            write_record(memoryview(obj.tensor.view(-1).numpy()), key, self.spec.dtype, self.shape,
                         memoryview(raw))
            for tier in todo:
                if self.tiers.put(tier, lm_key, obj):
                    self._stored[tier] += self.payload_bytes
                    if tier == "redis":
                        self._note_redis(key, True)
        finally:
            obj.ref_count_down()

    # -------------------------------------------------------- holdings
    def held_chunks(self) -> dict[str, list[bytes]]:
        """Chunk keys (32-byte block hashes) each local tier (dram, disk) holds now, per LMCache's index."""
        out: dict[str, list[bytes]] = {}
        for tier in ("dram", "disk"):
            backend = self.tiers.backends.get(tier)
            if backend is None:
                continue
            if tier == "dram":
                keys = backend.get_keys()
            else:
                with backend.disk_lock:
                    keys = list(backend.dict.keys())
            tag = self.tiers.model_tag
            out[tier] = [k.chunk_hash.to_bytes(32, "big") for k in keys if k.model_name == tag]
        return out

    def drain_redis_events(self) -> dict[bytes, bool]:
        """Redis keys seen since the last drain: True = held, False = missing (the last event per key)."""
        with self._redis_lock:
            events, self._redis_events = self._redis_events, {}
        return events

    def _note_redis(self, key: bytes, held: bool) -> None:
        with self._redis_lock:
            self._redis_events.pop(key, None)
            self._redis_events[key] = held

    # ------------------------------------------------------------ stats
    def stats(self) -> KVTierStats:
        failures = {t: c.failures for t, c in self.tiers.counters.items()}
        return KVTierStats(dict(self._hits), dict(self._hit_tokens), dict(self._loaded), dict(self._stored),
                           dict(self._corrupt), failures, self._lookups, self._load_s)

    def close(self) -> None:
        self.tiers.close()
