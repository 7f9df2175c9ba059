"""``LLMServer``: the Serve deployment that wraps one ``AsyncLLMEngine`` per replica.

``generate(prompt_token_ids, params, request_id, prefix_block_hashes=None)``
is an async generator: called through ``handle.options(stream=True)`` it
streams the engine's ``RequestOutput`` diffs back to the ingress. Model steps
run in the engine's worker thread (``AsyncLLMEngine``), so the replica's event
loop keeps serving other streams, health checks and ``stats`` calls while a
step computes. When the caller cancels the stream (its HTTP client went
away), Serve cancels this generator; ``AsyncLLMEngine.generate`` then aborts
the request, which frees its sequence and KV pages at the next step.

Admission bound: a replica holds at most ``max_num_seqs + max_waiting_requests``
requests; one more raises ``QueueFullError`` before touching the engine (the
ingress answers 429 with Retry-After), unless it had waited in Serve's queue
(``sent_at``, the ingress's wall clock at the call): then it waits for a slot
(server/admission.py ``AdmissionGate``). ``prefix_block_hashes`` is only read by
the request router; the worker ignores it. Every exception that leaves
``generate`` is an ``APIError`` (server/errors.py ``to_api_error``: a 4xx for a
bad request, 500 for a failed step), which crosses the Ray boundary intact.
``close()`` (engine closed: requests in flight end with a 500) makes
``check_health`` fail, so Serve replaces the replica.

Background tasks (started in the async ``__init__``, cancelled by ``__del__``/``close``):

* cache reporter: woken after every token batch, it drains the block pool's
  cache events (``BlockPool.record_events``), folds them into a
  ``CacheMirror`` and sends the diff to the deployment's prefix-tree actor
  (``report(replica_id, added_chains, evicted)``). Wake-ups that arrive
  while a report is in flight coalesce into the next one. With KV tiers on,
  the same call carries ``tiers=TierDiff`` from a ``TierMirror`` over the
  engine's ``tier_holdings()`` (held chunk keys, drained Redis events); the metrics
  pusher also wakes it every ``metrics_interval_s``, because disk and Redis
  writes finish asynchronously after the request's last token (so the
  router's view of a replica's tiers lags by at most one interval plus a
  report round trip). If the tree actor died, the replica looks it up again
  (recreated empty) and re-sends its whole device cache (``CacheMirror.resync``).
* metrics pusher: every ``metrics_interval_s`` it pushes a ``MetricsSnapshot``
  to the app's ``MetricsBoard`` (see metrics.py); if the board actor died, it is
  looked up again (recreated) for the next push. Snapshots carry cumulative
  counters, so a recreated board shows them whole after one push per replica.

Serve pulls two more reports from the replica:

* ``record_routing_stats`` (every ``request_routing_stats_period_s`` of the
  router config): the load the cost-aware router needs
  (routing/policy.py ``CostAwarePolicy``): prompt tokens queued and not
  prefilled yet, and the replica's capacity (``max_num_seqs``, token budget).
* ``record_autoscaling_stats`` (every autoscaling metrics interval): the
  signals of ``LLMAutoscalingPolicy`` (autoscaling.py): KV usage, waiting
  requests and the mean TTFT of the first tokens since the previous record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tierserve.config import EngineConfig
from tierserve.engine.outputs import RequestOutput
from tierserve.sampling_params import SamplingParams
from tierserve.server.admission import AdmissionGate
from tierserve.server.autoscaling import SIGNAL_KV_USAGE, SIGNAL_TTFT_S, SIGNAL_WAITING
from tierserve.server.cache_reporter import CacheMirror, TierMirror
from tierserve.server.errors import QueueFullError, replica_lost, to_api_error
from tierserve.server.metrics import WorkerMetrics, get_or_create_metrics_board

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What the ingress needs to know about the model a worker serves."""

    model_name: str
    max_model_len: int
    block_size: int
    replica_id: str
    vocab_size: int


@dataclass(frozen=True)
class WorkerStats:
    """A replica's live state (for tests and debugging)."""

    replica_id: str
    active: int
    running: int
    waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int


class LLMServer:
    async def __init__(self, engine_config: EngineConfig, served_model_name: str | None = None,
                 max_waiting_requests: int = 64, retry_after_s: int = 1, metrics_interval_s: float = 1.0):
        from ray import serve

        from tierserve.engine.async_engine import AsyncLLMEngine
        from tierserve.routing.tree_actor import get_or_create_tree_actor

        from tierserve.actors.ray_launcher import RayHostLauncher

        # expert hosts of an offloading replica are Ray actors on the cluster's expert_host nodes
        host_launcher = RayHostLauncher() if engine_config.offload.enabled else None
        self.engine = AsyncLLMEngine(engine_config, host_launcher=host_launcher)
        self._info = self.engine.info()
        self.model_name = served_model_name or self._info.model_name
        self.capacity = engine_config.scheduler.max_num_seqs + max_waiting_requests
        self._sched_config = engine_config.scheduler
        self._ttft_seen = (0.0, 0)  # TTFT histogram (total, count) at the last autoscaling record
        self.retry_after_s = retry_after_s
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self._tree = get_or_create_tree_actor(ctx.app_name, ctx.deployment)
        self._board = get_or_create_metrics_board(ctx.app_name)
        self._metrics = WorkerMetrics(self.model_name)
        self._metrics_interval_s = metrics_interval_s
        self._mirror = CacheMirror()
        self._tier_mirror = TierMirror(engine_config.kv_tiers.chunk_blocks) if engine_config.kv_tiers.enabled else None
        self.engine.record_cache_events()
        self._gate = AdmissionGate(self.capacity)
        self._closed = False
        self._report_wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._report_loop()), loop.create_task(self._metrics_loop())]

    # ------------------------------------------------------------------ calls
    async def info(self) -> WorkerInfo:
        return WorkerInfo(self.model_name, self._info.max_model_len, self._info.block_size, self.replica_id,
                          self.engine.engine.vocab_size)

    async def get_tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prefix_block_hashes: list[bytes] | None = None,
                       sent_at: float | None = None) -> AsyncIterator[RequestOutput]:
        waited_s = time.time() - sent_at if sent_at is not None else 0.0
        if not await self._gate.enter(waited_s):
            raise to_api_error(QueueFullError(self.capacity, self.retry_after_s))
        start = time.monotonic()
        last = None
        reason = "abort"
        try:
            stream = self.engine.generate(prompt_token_ids, params, request_id)
            async with contextlib.aclosing(stream):  # closing it aborts an unfinished request
                out = await stream.__anext__()
                while True:
                    now = time.monotonic()
                    self._metrics.observe_token(start, last, now, out.num_prompt_tokens, len(out.new_token_ids))
                    last = now
                    if out.finished:
                        reason = out.finish_reason or "stop"
                    self._report_wake.set()
                    yield out
                    if out.finished:
                        break
                    out = await stream.__anext__()
        except Exception as exc:  # validation (4xx) or a failed step (500): a picklable APIError for the ingress
            raise to_api_error(exc, self.retry_after_s) from None
        finally:
            self._gate.leave()
            if last is not None:
                self._metrics.observe_finish(start, time.monotonic(), reason)
            self._report_wake.set()

    async def stats(self) -> WorkerStats:
        s = self.engine.stats()
        return WorkerStats(self.replica_id, self._gate.active, s.running, s.waiting, s.kv_usage, s.num_free_blocks,
                           s.prefix_queries, s.prefix_hits)

    async def record_routing_stats(self) -> dict[str, int]:
        """Load and capacity for the cost-aware router (Serve polls it; routing/serve_router.py reads it)."""
        from tierserve.routing.serve_router import routing_stats

        return routing_stats(self.engine.stats().pending_prefill_tokens, self._sched_config.max_num_seqs,
                             self._sched_config.max_num_batched_tokens)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Signals of the LLM autoscaling policy (server/autoscaling.py), polled by Serve."""
        s = self.engine.stats()
        ttft = self._metrics.snapshot.ttft
        total, count = ttft.total - self._ttft_seen[0], ttft.count - self._ttft_seen[1]
        self._ttft_seen = (ttft.total, ttft.count)
        return {SIGNAL_KV_USAGE: float(s.kv_usage), SIGNAL_WAITING: float(s.waiting),
                SIGNAL_TTFT_S: total / count if count else 0.0}

    def check_health(self) -> None:
        """Serve's health check: fail when the engine was closed or a background task died (Serve replaces the
        replica)."""
        if self._closed:
            raise RuntimeError("the engine of this replica is closed")
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"background task failed: {task.exception()!r}")

    # -------------------------------------------------------------- background
    async def _report_loop(self) -> None:
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            self._mirror.apply(self.engine.drain_cache_events())
            chains, evicted = self._mirror.diff()
            tiers = self._tier_diff()
            if chains or evicted or tiers is not None:
                try:
                    await self._tree.report.remote(self.replica_id, chains, evicted, tiers)
                except Exception as exc:  # the tree is a routing hint: never fail a request over it
                    logger.exception("prefix tree report failed")
                    if replica_lost(exc):  # the tree actor died: report everything to its successor
                        await self._reconnect_tree()
                else:
                    if self._tier_mirror is not None:
                        self._tier_mirror.ack()

    async def _reconnect_tree(self) -> None:
        """Look the tree actor up again (recreating it) and re-send this replica's whole device cache."""
        from ray import serve

        from tierserve.routing.tree_actor import get_or_create_tree_actor

        ctx = serve.get_replica_context()
        self._tree = await asyncio.to_thread(get_or_create_tree_actor, ctx.app_name, ctx.deployment)
        self._mirror.resync()
        self._report_wake.set()

    def _tier_diff(self):
        """Lower-tier chunks gained/lost since the last report (None: no change or tiers off)."""
        if self._tier_mirror is None:
            return None
        try:
            holdings = self.engine.tier_holdings()
            return self._tier_mirror.diff(holdings.held, holdings.shared_events)
        except Exception:  # a routing hint: never fail a request over it
            logger.exception("KV tier holdings report failed")
            return None

    async def _metrics_loop(self) -> None:
        while True:
            try:
                await self.push_metrics()
            except Exception:  # a failed read of the gauges must not end the loop (stale metrics, no restart)
                logger.exception("metrics snapshot failed")
            if self._tier_mirror is not None:  # disk/Redis writes land after the last token: re-report
                self._report_wake.set()
            await asyncio.sleep(self._metrics_interval_s)

    async def push_metrics(self) -> None:
        s = await self.stats()
        snap = self._metrics.take(s.running, s.waiting, s.kv_usage, s.prefix_queries, s.prefix_hits,
                                  self.engine.expert_metrics())
        snap.kv_tiers = self.engine.kv_tier_stats()  # hits/bytes per tier, load time (None without tiers)
        spec = self.engine.spec_decode_stats()
        snap.spec = spec if spec.method != "none" else None  # drafts proposed/accepted (None when off)
        try:
            await self._board.push.remote(self.replica_id, snap)
        except Exception as exc:
            logger.exception("metrics push failed")
            if replica_lost(exc):  # the board actor died: the next push goes to its successor
                from ray import serve

                self._board = await asyncio.to_thread(get_or_create_metrics_board,
                                                      serve.get_replica_context().app_name)

    async def close(self) -> None:
        """Stop the background tasks and close the engine: requests in flight end with an error (500)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.close()

    def __del__(self):
        for task in getattr(self, "_tasks", ()):
            task.cancel()

