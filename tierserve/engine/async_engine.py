"""AsyncLLMEngine: many concurrent ``generate`` streams served by one step loop.

The engine is owned by one background task. Each step runs in a worker
thread (``asyncio.to_thread``) so the event loop keeps serving other streams
while the model computes. Callers never touch the engine directly: new
requests go through an inbox and aborts through an abort list (both
thread-safe deques), drained by the worker thread before each step; outputs
are routed to per-request asyncio queues on the event loop. A consumer that
stops iterating (a client disconnect cancels it) aborts its request, which
frees its sequence and pages at the next step.

Failures. An exception raised inside a step is delivered to every request
the engine holds (each is aborted, its pages freed) and the loop goes on
with the next step. ``close()`` lets a running step finish (the worker
thread is never abandoned mid-step), stops the loop, aborts every request
still in flight and ends each waiting ``generate`` with
``RuntimeError("AsyncLLMEngine is closed")``, then closes the engine.
Tests: tests/test_engine_stops.py.

Read-only views of the engine (``info``, ``stats``, ``drain_cache_events``,
``tier_holdings``, ``expert_metrics``, ``kv_tier_stats``, ``spec_decode_stats``) delegate to the
``LLMEngine`` facade; they read counters and thread-safe queues, so the event
loop may call them while a step runs in the worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncIterator

from tierserve.config import EngineConfig
from tierserve.engine.engine_stats import EngineInfo, EngineStats
from tierserve.engine.llm_engine import LLMEngine
from tierserve.engine.outputs import RequestOutput
from tierserve.errors import ContextLengthError, InvalidParameterError
from tierserve.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None, host_launcher=None):
        self.engine = engine or LLMEngine(config, host_launcher=host_launcher)
        self._inbox: collections.deque = collections.deque()
        self._aborts: collections.deque = collections.deque()
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._closed = False

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ----------------------------------------------------------- read-only facade
    def info(self) -> EngineInfo:
        return self.engine.info()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def record_cache_events(self) -> None:
        self.engine.record_cache_events()

    def drain_cache_events(self) -> list[tuple[str, bytes, bytes | None]]:
        return self.engine.drain_cache_events()

    def tier_holdings(self):
        return self.engine.tier_holdings()

    def expert_metrics(self):
        return self.engine.expert_metrics()

    def kv_tier_stats(self):
        return self.engine.kv_tier_stats()

    def spec_decode_stats(self):
        return self.engine.spec_decode_stats()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutput diffs as tokens come; the last one has ``finished=True``.

        Validation errors (empty prompt, context overflow, ...) raise here,
        before the request enters the engine.
        """
        if self._closed:
            raise RuntimeError("AsyncLLMEngine is closed")
        params = params or SamplingParams()
        request_id = request_id or f"areq-{next(self._ids)}"
        if request_id in self._queues:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        ids = self.engine.tokenize(prompt)
        if len(ids) >= self.engine.max_model_len:
            raise ContextLengthError(len(ids), self.engine.max_model_len)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._inbox.append((request_id, ids, params))
        self._start()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._aborts.append(request_id)
                self._poke()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            if not (self._inbox or self._aborts or self.engine.has_unfinished()):
                await self._wake.wait()
                continue
            try:
                outputs, errors = await asyncio.to_thread(self._step)
            except Exception as exc:  # a failed step fails its requests, not the loop
                self._fail_all(exc)
                continue
            for rid, exc in errors:
                self._deliver(rid, exc)
            for out in outputs:
                self._deliver(out.request_id, out)

    def _step(self):
        """Runs in the worker thread: the only place that touches the engine."""
        errors = []
        while self._aborts:
            self.engine.abort(self._aborts.popleft())
        while self._inbox:
            rid, ids, params = self._inbox.popleft()
            if rid not in self._queues:  # cancelled before it started
                continue
            try:
                self.engine.add_request(ids, params, request_id=rid)
            except Exception as exc:
                errors.append((rid, exc))
        outputs = self.engine.step() if self.engine.has_unfinished() else []
        return outputs, errors

    def _deliver(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _fail_all(self, exc: Exception) -> None:
        for rid in self.engine.request_ids():
            self.engine.abort(rid)
            self._deliver(rid, exc)

    async def close(self) -> None:
        """Stop the loop after its current step, end every request in flight with an error, close the engine."""
        self._closed = True
        if self._task is not None:
            self._poke()
            await self._task  # the loop exits at its next check; a running step completes first
            self._task = None
        self._inbox.clear()
        closed = RuntimeError("AsyncLLMEngine is closed")
        for rid in list(self._queues):
            if rid in self.engine.request_ids():
                self.engine.abort(rid)  # no step runs now: the loop has exited
            self._deliver(rid, closed)
        await asyncio.to_thread(self.engine.close)  # expert hosts, usage file, KV tier backends
