"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.

Each ``schedule()`` call fills one step under a token budget
``B = config.max_num_batched_tokens``; a request's chunk is

    n = min(tokens left to compute, budget left, T)    with T = long_prefill_token_threshold
                                                        (no T cap when T == 0)

1. Running requests, in running (admission) order. If the KV manager cannot
   allocate blocks for the chunk, the most recently admitted running request
   (``running[-1]``) is preempted -- its blocks are freed tail first, its
   ``num_computed_tokens`` reset to 0, ``num_preemptions`` += 1, status
   PREEMPTED -- and put at the *front* of the waiting queue; then the
   allocation is retried. If the victim is the request being scheduled, no
   further running request is scheduled this step. Victims are always later
   in running order than the request being scheduled, so they were not yet
   scheduled this step.
2. Only if nothing was preempted this step, waiting requests are admitted
   strictly FCFS while budget remains and ``len(running) < max_num_seqs``: the
   prefix cache supplies whole blocks (at least one token is always left to
   compute), the chunk is sized as above, and the first request whose blocks
   do not fit stops admission (no skipping ahead). A preempted request
   re-enters at the front and recomputes prompt + generated tokens (minus
   whatever blocks the prefix cache still holds). With an external prefix
   source (``external``, tierserve/step/hooks.py ``ExternalPrefixSource``:
   the KV tiers), the tokens after the device prefix hit that it serves
   (``external.match``: whole chunks, at least one token left) are marked
   computed too and take no budget; ``external.commit`` queues their copy
   into the newly allocated blocks before the step's forward. Without one, a
   null source matches nothing.

``req.num_computed_tokens`` advances at schedule time (as in vLLM v1): the
runner computes tokens ``[start, start + num_tokens)``. A request samples iff
``start + num_tokens == req.num_tokens`` at schedule time; the engine then
appends the sampled token, so the next step schedules exactly that one token.
Finished requests are reported by the engine through ``finish``.

Speculative decoding: a running request with exactly one token left to
compute (decoding) and drafts in ``req.spec_token_ids`` is scheduled for
``1 + d`` tokens, ``d = min(len(drafts), budget - 1)`` (the drafts trimmed to
the budget), its blocks allocated for all of them; if they do not fit it is
scheduled without drafts (drafts never cause a preemption).
``ScheduledRequest.spec_token_ids`` carries the drafts to the runner and the
engine, and an undo log entry (computed tokens and block count before the
step; O(1) per request) lets ``rollback`` return the request to the
computed tokens the verification kept, freeing only blocks past them.
A draft tree (spec_decode/tree.py) arrives as its flattened nodes, so it is
budgeted per node (1 + nodes tokens, a slot each); a trimmed tree is the
prefix of its breadth-first order, which is a tree again.

Capacity: ``add_request`` rejects a request whose prompt + max_tokens - 1
tokens (the most it can ever have computed) need more blocks than the whole
pool, so a request running alone always fits and preemption cannot livelock.
"""

from __future__ import annotations

from collections import deque

from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.config import SchedulerConfig
from tierserve.engine.request import Request, RequestStatus
from tierserve.errors import InvalidParameterError
from tierserve.step.hooks import ExternalPrefixSource
from tierserve.step.schedule import ScheduledRequest, SchedulerOutput


class NoExternalPrefix:
    """The external prefix source of an engine without KV tiers: it never serves a token."""

    def match(self, request: Request, num_device_hit: int) -> int:
        return 0

    def commit(self, request: Request, num_device_hit: int, num_external: int) -> None:
        raise AssertionError("commit without a match")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int | None = None,
                 external: ExternalPrefixSource | None = None):
        self.config = config
        self.kv = kv
        self.external: ExternalPrefixSource = external if external is not None else NoExternalPrefix()
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._requests: dict[str, Request] = {}
        #: speculative decoding's undo log: request id -> (computed tokens, blocks) before this step's drafts
        self._undo: dict[str, tuple[int, int]] = {}

    # -- request lifecycle ------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self._requests:
            raise InvalidParameterError("request_id", f"{req.request_id!r} is already scheduled")
        if req.num_prompt_tokens < 1:
            raise InvalidParameterError("prompt", "must contain at least one token")
        if req.status is not RequestStatus.WAITING or req.block_ids or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id} must be new (WAITING, no blocks, nothing computed)")
        max_computed = req.num_prompt_tokens + req.params.max_tokens - 1
        if self.max_model_len is not None:  # generation stops at max_model_len anyway
            max_computed = min(max_computed, self.max_model_len - 1)
        bs = self.kv.block_size
        if -(-max_computed // bs) > self.kv.num_blocks:
            raise InvalidParameterError(
                "max_tokens",
                f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.params.max_tokens}) "
                f"needs {-(-max_computed // bs)} KV blocks of {bs} tokens but the cache has "
                f"{self.kv.num_blocks} (at most {self.kv.num_blocks * bs} tokens)")
        self._requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; unknown or already finished ids are ignored."""
        req = self._requests.get(request_id)
        if req is not None:
            self._remove(req, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """The engine saw a stop condition: free the request's blocks and forget it."""
        if not status.finished:
            raise InvalidParameterError("status", f"must be a finished status, got {status}")
        self._remove(self.get(request_id), status)

    def get(self, request_id: str) -> Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown or finished request id {request_id!r}") from None

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_pending_prefill_tokens(self) -> int:
        """Prompt tokens of waiting and running requests whose KV is not computed yet (the router's load)."""
        return sum(max(0, r.num_prompt_tokens - r.num_computed_tokens)
                   for r in (*self.waiting, *self.running))

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(self.config.max_num_batched_tokens, scheduled, preempted)
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return SchedulerOutput(tuple(scheduled), tuple(preempted), sum(s.num_tokens for s in scheduled))

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest],
                          preempted: list[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            drafts, new_blocks = self._allocate_drafts(req, budget)
            n += len(drafts)
            if not drafts:
                new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    return budget
                new_blocks = self.kv.allocate_slots(req, n)
            scheduled.append(self._advance(req, n, new_blocks, resumed=False, drafts=drafts))
            budget -= n
            i += 1
        return budget

    def _allocate_drafts(self, req: Request, budget: int) -> tuple[tuple[int, ...], list[int] | None]:
        """A decoding request's drafts that fit the budget, with their blocks allocated (and the undo log
        entry written); ``((), None)`` when it has none or they do not fit (drafts never preempt)."""
        if req.num_tokens - req.num_computed_tokens != 1 or not req.spec_token_ids:
            return (), None
        drafts = tuple(req.spec_token_ids[:budget - 1])
        if not drafts:
            return (), None
        num_blocks = len(req.block_ids)
        new_blocks = self.kv.allocate_slots(req, 1 + len(drafts))
        if new_blocks is None:
            return (), None
        self._undo[req.request_id] = (req.num_computed_tokens, num_blocks)
        return drafts, new_blocks

    def rollback(self, request_id: str, num_computed_tokens: int) -> list[int]:
        """After verification: ``request_id`` keeps the KV of ``num_computed_tokens`` tokens; the blocks past
        them are freed (their ids returned). Only a request scheduled with drafts this step, by the undo log."""
        start, num_blocks = self._undo.pop(request_id)
        req = self.get(request_id)
        if num_computed_tokens <= start:
            raise InvalidParameterError("num_computed_tokens", f"must be > {start} (the verified token's "
                                                               f"position) for {request_id}, got {num_computed_tokens}")
        freed = self.kv.truncate(req, num_computed_tokens)
        assert len(req.block_ids) >= num_blocks, "rollback freed blocks held before the step"
        return freed

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            num_ext = self.external.match(req, num_hit)
            n = self._chunk(req.num_tokens - num_hit - num_ext, budget)
            new_blocks = self.kv.allocate_slots(req, num_ext + n, hit_blocks)
            if new_blocks is None:
                return
            self.waiting.popleft()
            if req.status is RequestStatus.WAITING:
                req.num_cached_tokens = num_hit + num_ext
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit + num_ext
            if num_ext:  # the source copies those tokens' KV in before the forward
                self.external.commit(req, num_hit, num_ext)
            self.running.append(req)
            scheduled.append(self._advance(req, n, hit_blocks + new_blocks, resumed=True))
            budget -= n

    def _chunk(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        threshold = self.config.long_prefill_token_threshold
        return min(n, threshold) if threshold > 0 else n

    @staticmethod
    def _advance(req: Request, n: int, new_blocks: list[int], resumed: bool,
                 drafts: tuple[int, ...] = ()) -> ScheduledRequest:
        start = req.num_computed_tokens
        req.num_computed_tokens = start + n
        return ScheduledRequest(req.request_id, start, n, tuple(new_blocks), resumed, drafts)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def _remove(self, req: Request, status: RequestStatus) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = status
        self._undo.pop(req.request_id, None)
        del self._requests[req.request_id]
