"""KVTierConnector: moves whole KV chunks between the engine's paged KV and the lower tiers.

It is a step hook (tierserve/step/hooks.py ``StepHook``) of the engine and
the scheduler's external prefix source (``ExternalPrefixSource``: ``match`` /
``commit``). It is built over the engine's KV pages
(``KVTierConnector(config, spec, model_tag, kv_caches)``, one per layer, in
any page format that lists its ``parts()``: plain ``LayerKV``, kv4's packed
pages, XQuant's latent pages), since no hook call carries them, and over the
backends of
``config.tiers`` (registry.py), which it only ever sees through the
``TierBackend`` contract (backend.py), in lookup order, fastest first.

Chunks. With ``C = chunk_blocks * block_size`` tokens per chunk, chunk ``j``
of a request covers tokens ``[j*C, (j+1)*C)`` (only whole chunks are ever
stored). Its key is the chained SHA-256 block hash of its last block
(chunk.py ``chunk_keys``); its record (chunk.py) carries the payload with a
BLAKE3 checksum: the chunk's blocks as the pages store them (chunk_layout.py;
for plain pages the ``[L, 2, C, kv_heads, head_dim]`` tensor, for a
compressed format its packed bytes, so a chunk shrinks by the format's ratio
and a hit loads compressed pages). The model tag that prefixes every key
names the page format, so chunks of different formats never meet.

Lookup before prefill (``match``, called by the scheduler when it admits a
request): with ``h`` tokens already served by the device prefix cache and
``cap = ((num_tokens - 1) // block_size) * block_size`` (at least one token
is always left to compute), walk chunks ``j = h // C, h // C + 1, ...`` while
``j*C < cap`` and the chunk is whole in the known tokens; for each, try the
backends in order (dram > disk > redis) and take the first record that passes
``verify_record``. A record that fails is counted (``corrupt``), removed from
that tier, and the next tier is tried; a chunk no tier serves ends the walk.
The request gets ``e = min(end of last chunk, cap) - h`` extra tokens (0 if
negative): the longest chunk-aligned prefix that hits, minus what the device
cache had. Records are fetched and verified here, at schedule time, so a
corrupt chunk can only shorten the hit, never fail a step. A hit from a
slower tier is also put into every faster tier with ``caches_lower_hits``
(DRAM). A request matched again with the same device hit (it waited at the
head of the queue) keeps what it fetched: no second read.

Load (``before_forward``): the scheduler has allocated blocks for the ``e``
tokens and marked them computed (``commit``); the verified payload slices are
copied into those blocks' pages of every layer (``ChunkLayout.scatter``).
The blocks are registered in the device prefix cache by the scheduler as usual.

Store (``after_forward`` for every request whose prompt finished computing in
the step, and ``on_finish``): every whole chunk of the request's computed
tokens that some tier lacks (each backend is asked ``contains``; Redis answers
a miss without a call while its breaker is open) and that is not already being
stored is gathered from its blocks into a host buffer (``ChunkLayout.gather_async``)
and registered as a pending store (store_ledger.py). On CPU pages the copy is
complete at once; on GPU pages it is a device-to-host copy on a side stream with
an event, and the step does not wait for it. Pending stores complete, oldest
first, at the next hook call whose copies have landed (``before_forward``,
``after_forward``, ``on_finish``), every one of them at ``close``: the record is
written (chunk.py) into an LMCache buffer and put into every tier that lacked the
chunk; disk and Redis writes then finish on LMCache's event loop. A chunk is
readable only once its store completed: a lookup (``match``) that meets a pending
key waits for that store first. A store that fails is logged and never fails the
request, and it is counted in that tier's ``failures``: a failing tier call or write
by the backend itself (backend.py; the disk tier also counts a write that
fails later on the event loop, disk.py), and a chunk the connector could not
build (no free LMCache buffer, an error gathering it) once for every tier
that lacked it. A failed chunk is tried again at the request's next store.
Loads from GPU pages stage the verified payload in pinned memory and copy it
host-to-device on the compute stream without blocking the host.

Holdings for the router (``holdings() -> TierHoldings``, read by the worker's
cache reporter, server/cache_reporter.py ``TierMirror``): the chunk keys each
private tier (DRAM, disk) holds now, read from LMCache's own indexes, so LRU
evictions are seen at the next report; and, for the shared Redis, its drained
event log (redis.py: the net last event per key since the last call).

Stats (``stats()`` -> KVTierStats): per tier the chunks and tokens served,
bytes loaded and stored, checksum failures, failures (the backend's own plus
the chunks the connector could not build for it, see Store; bytes stored
leave out the puts whose write failed later, ``lost_puts``); total
seconds spent fetching + verifying + copying loaded chunks; lookups.

Tests: tests/test_kv_tiers.py (logits after a load from each tier equal a
full recompute; corrupted disk records are recomputed; Redis slow, then
killed mid-run), tests/test_kv_tiers_processes.py (keys across
PYTHONHASHSEED values; a second process served from Redis),
tests/test_tier_routing_connector.py (holdings reach the router),
tests/test_kv_tiers_backends.py (each backend's contract, Redis failures),
tests/test_kv_tiers_store_failures.py (stores failing on disk and for lack of
buffer space, a stopped Redis: counted exactly, output identical to an engine
without tiers),
tests/test_kv_tiers_pressure.py (a full DRAM tier evicts LRU chunks; the walk
stops at the first evicted chunk; output identical to a recompute),
tests/test_store_ledger.py (pending stores: order, readability),
tests/test_kv_tiers_async_cuda.py (asynchronous stores from GPU pages, ``cuda``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tierserve.cache.tiers.backend import TierBackend
from tierserve.cache.tiers.chunk import CorruptChunkError, chunk_keys, record_size, verify_record, write_record
from tierserve.cache.tiers.chunk_layout import ChunkLayout
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.registry import build_tiers
from tierserve.cache.tiers.stats import KVTierStats
from tierserve.cache.tiers.store_ledger import StoreLedger
from tierserve.errors import InvalidParameterError
from tierserve.kernels.kv_spec import KVSpec
from tierserve.step.hooks import StepHook
from tierserve.step.request_view import RequestView
from tierserve.step.schedule import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierHoldings:
    """What the lower tiers hold, for the router (module doc).

    ``held``: private tier name -> chunk keys it holds now (a snapshot).
    ``shared_events``: the shared tier's (Redis) net last event per chunk key
    since the previous ``holdings()`` call, True held / False missing; the
    call drained them, so each event is reported once.
    """

    held: Mapping[str, frozenset[bytes]]
    shared_events: Mapping[bytes, bool]


@dataclass
class _Store:
    """A chunk store in flight: its host payload, complete once ``done`` (None: already) completed."""

    payload: torch.Tensor
    done: object | None  # torch.cuda.Event on GPU pages
    todo: list[TierBackend]


@dataclass
class _Fetched:
    start: int                       # first token the hit covers (the device hit h)
    end: int                         # h + e
    chunks: list[tuple[int, torch.Tensor]]  # (chunk index, payload bytes, uint8)


class KVTierConnector(StepHook):
    def __init__(self, config: KVTierConfig, spec: KVSpec, model_tag: str, kv_caches: Sequence):
        if len(kv_caches) != spec.num_layers:
            raise InvalidParameterError("kv_caches", f"needs one page set per layer ({spec.num_layers}), "
                                                     f"got {len(kv_caches)}")
        self.config = config
        self.spec = spec
        self.kv_caches = list(kv_caches)
        self.chunk_blocks = config.chunk_blocks
        self.chunk_tokens = config.chunk_blocks * spec.block_size
        self.shape = (spec.num_layers, 2, self.chunk_tokens, spec.num_kv_heads, spec.head_dim)
        self.layout = ChunkLayout(self.kv_caches, self.chunk_blocks)
        self.payload_bytes = self.layout.payload_bytes
        self._pinned = self.layout.parts[0].is_cuda  # loads staged in pinned memory: copied without blocking
        self.runtime, self.backends = build_tiers(config, model_tag, spec.dtype, self.chunk_tokens, self.shape)
        self._fetched: dict[str, _Fetched] = {}
        self._pending: list[tuple[list[int], list[tuple[int, torch.Tensor]], int]] = []
        self._hashes: dict[str, list[bytes]] = {}
        self._stores: StoreLedger[_Store] = StoreLedger()
        names = [b.name for b in self.backends]
        self._hits = dict.fromkeys(names, 0)
        self._hit_tokens = dict.fromkeys(names, 0)
        self._loaded = dict.fromkeys(names, 0)
        self._stored = dict.fromkeys(names, 0)
        self._corrupt = dict.fromkeys(names, 0)
        self._store_failures = dict.fromkeys(names, 0)
        self._lookups = 0
        self._load_s = 0.0

    def backend(self, name: str) -> TierBackend:
        """The backend of tier ``name`` (for tests and tools; the connector itself never looks one up)."""
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"no {name!r} tier; configured: {[b.name for b in self.backends]}")

    # ------------------------------------------------------------- keys
    def _request_keys(self, req: RequestView, num_chunks: int) -> list[bytes]:
        keys = self._hashes.get(req.request_id)
        if keys is None or len(keys) < num_chunks:
            keys = chunk_keys(req.token_ids(0, num_chunks * self.chunk_tokens), self.spec.block_size,
                              self.chunk_blocks)
            self._hashes[req.request_id] = keys
        return keys

    # ------------------------------------------- scheduler side (ExternalPrefixSource)
    def match(self, request: RequestView, num_device_hit: int) -> int:
        """Extra tokens after ``num_device_hit`` that the tiers can serve (fetched and verified now).

        A request retried at the head of the queue (its blocks did not fit) keeps what it fetched while its
        device hit is unchanged: the chunks are not read and verified again on every step it waits."""
        prev = self._fetched.pop(request.request_id, None)
        if prev is not None and prev.start == num_device_hit:
            self._fetched[request.request_id] = prev
            return prev.end - prev.start
        bs, C = self.spec.block_size, self.chunk_tokens
        cap = ((request.num_tokens - 1) // bs) * bs
        first = num_device_hit // C
        if first * C >= cap:
            return 0
        self._lookups += 1
        t0 = time.perf_counter()
        max_chunks = min(-(-cap // C), request.num_tokens // C)
        keys = self._request_keys(request, max_chunks)
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
        self._fetched[request.request_id] = _Fetched(num_device_hit, end, chunks)
        return end - num_device_hit

    def _fetch(self, key: bytes) -> torch.Tensor | None:
        """The verified payload of chunk ``key`` from the fastest tier that has a valid record, or None."""
        self._complete_stores(wait_for=key)  # a chunk is readable only once its store completed
        for i, backend in enumerate(self.backends):
            record = backend.get(key)
            if record is None:
                continue
            try:
                payload = verify_record(record.view(), key, self.spec.dtype, self.shape, self.payload_bytes)
            except CorruptChunkError as exc:
                self._corrupt[backend.name] += 1
                logger.warning("KV tier %s: chunk %s rejected (%s); recomputing it", backend.name, key.hex()[:16],
                               exc.reason)
                record.release()
                backend.remove(key)
                continue
            out = torch.empty(self.payload_bytes, dtype=torch.uint8, pin_memory=self._pinned)
            out.numpy()[:] = payload
            for faster in self.backends[:i]:
                if faster.caches_lower_hits:
                    faster.put(key, record)
            record.release()
            self._hits[backend.name] += 1
            self._hit_tokens[backend.name] += self.chunk_tokens
            self._loaded[backend.name] += self.payload_bytes
            return out
        return None

    def commit(self, request: RequestView, num_device_hit: int, num_external: int) -> None:
        """The scheduler allocated the request's blocks and marked the tier tokens computed: queue the copy."""
        f = self._fetched.pop(request.request_id, None)
        if num_external <= 0:
            return
        if f is None or f.start != num_device_hit or f.end != num_device_hit + num_external:
            raise ValueError(f"request {request.request_id}: commit does not match the last match()")
        bs = self.spec.block_size
        blocks = request.block_ids[f.start // bs:f.end // bs]
        self._pending.append((blocks, f.chunks, f.start))

    # ------------------------------------------------------ engine side (StepHook)
    def before_forward(self, sched: SchedulerOutput, requests: Mapping[str, RequestView]) -> None:
        """Copy every committed chunk slice into its blocks (the loads of this step's admissions)."""
        self._complete_stores()
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
                self.layout.scatter(payload, (lo - j * C) // bs, blocks[(lo - start) // bs:(hi - start) // bs])
                pos = hi
        self._pending.clear()
        self._load_s += time.perf_counter() - t0

    def after_forward(self, sched: SchedulerOutput, requests: Mapping[str, RequestView]) -> None:
        """Store the prompt chunks of every request whose prompt finished computing this step."""
        for sr in sched.scheduled:
            req = requests.get(sr.request_id)
            if req is None:
                continue
            if sr.start < req.num_prompt_tokens <= sr.start + sr.num_tokens:
                self._store(req, req.num_prompt_tokens)

    def on_finish(self, request: RequestView) -> None:
        """Store every whole chunk of the finished request's computed tokens (its blocks are still held)."""
        self._store(request, request.num_computed_tokens)

    def on_release(self, request_id: str) -> None:
        self._fetched.pop(request_id, None)
        self._hashes.pop(request_id, None)

    def _store(self, req: RequestView, num_tokens: int) -> None:
        """Start storing every whole chunk of ``req``'s first ``num_tokens`` computed tokens (module doc, Store)."""
        num_chunks = min(num_tokens, req.num_computed_tokens) // self.chunk_tokens
        if num_chunks == 0:
            return
        keys = self._request_keys(req, num_chunks)
        for j in range(num_chunks):
            if self._stores.pending(keys[j]):
                continue  # its copy is under way: the tiers get it when it completes
            todo = [b for b in self.backends if not b.contains(keys[j])]
            if not todo:
                continue
            try:
                payload, done = self.layout.gather_async(
                    req.block_ids[j * self.chunk_blocks:(j + 1) * self.chunk_blocks])
            except Exception:  # a tier's store failing must never fail the request
                logger.exception("KV tier store of chunk %s failed", keys[j].hex()[:16])
                self._count_store_failure(todo)
                continue
            self._stores.issue(keys[j], _Store(payload, done, todo))
        self._complete_stores()

    def _complete_stores(self, wait_for: bytes | None = None, wait_all: bool = False) -> None:
        """Write every pending store whose copy completed into its tiers, oldest first (module doc, Store);
        waits for the copies up to ``wait_for`` (or all of them with ``wait_all``)."""
        waiting = wait_all or (wait_for is not None and self._stores.pending(wait_for))
        for key in self._stores.oldest():
            st = self._stores.ticket(key)
            if st.done is not None:
                if waiting:
                    st.done.synchronize()
                elif not st.done.query():
                    break  # one side stream: the later copies are not done either
            self._stores.complete(key)
            try:
                built = self._store_chunk(key, st.payload, st.todo)
            except Exception:  # a tier's store failing must never fail the request
                logger.exception("KV tier store of chunk %s failed", key.hex()[:16])
                built = False
            if not built:
                self._count_store_failure(st.todo)
            if key == wait_for and not wait_all:
                waiting = False

    def _count_store_failure(self, todo: list[TierBackend]) -> None:
        """No tier got the chunk: one failure for each tier that should have (module doc)."""
        for backend in todo:
            self._store_failures[backend.name] += 1

    def _store_chunk(self, key: bytes, payload: torch.Tensor, todo: list[TierBackend]) -> bool:
        """Write the chunk's record and hand it to every tier in ``todo``; False when no buffer was free."""
        record = self.runtime.allocate(record_size(self.payload_bytes))
        if record is None:
            logger.warning("KV tiers: no DRAM buffer space for a %d-byte chunk; not stored", self.payload_bytes)
            return False
        try:
            write_record(record.view(), key, self.spec.dtype, self.shape, memoryview(payload.numpy()))
            for backend in todo:
                if backend.put(key, record):
                    self._stored[backend.name] += self.payload_bytes
        finally:
            record.release()
        return True

    # -------------------------------------------------------- router and stats
    def holdings(self) -> TierHoldings:
        """Keys each private tier holds now and the shared tier's drained events (module doc)."""
        held: dict[str, frozenset[bytes]] = {}
        events: dict[bytes, bool] = {}
        for backend in self.backends:  # thread safe: the backends read LMCache's indexes and logs under locks
            h = backend.holdings()
            if h.keys is not None:
                held[backend.name] = h.keys
            events.update(h.events)
        return TierHoldings(held, events)

    def stats(self) -> KVTierStats:
        failures = {b.name: b.failures + self._store_failures[b.name] for b in self.backends}
        stored = {b.name: self._stored[b.name] - b.lost_puts * self.payload_bytes for b in self.backends}
        return KVTierStats(dict(self._hits), dict(self._hit_tokens), dict(self._loaded), stored,
                           dict(self._corrupt), failures, self._lookups, self._load_s)

    def close(self) -> None:
        """Finish the stores in flight, close every backend, then the shared LMCache runtime (its event loop)."""
        self._complete_stores(wait_all=True)
        for backend in self.backends:
            backend.close()
        self.runtime.close()
