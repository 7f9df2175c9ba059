"""OffloadHook: the live state of an offloaded model — placement, hosts, usage, promotions.

``apply_expert_offload`` (tierserve.offload.apply) returns it, fully built by
``offload_from_config`` (tierserve.offload.build). It is the expert-offload
``StepHook`` (tierserve.step.hooks): the engine calls ``at_request_boundary()``
between steps after a step in which a request finished, ``stats()`` for the
``ExpertMetrics`` its replica exports, and ``close()`` once.

Usage. ``base`` holds the counts the placement was computed from (the usage file
loaded at start, or zeros), ``live`` the counts recorded since (a route recorder,
tierserve.offload.usage_hook, on every offloaded block). ``counts()`` = base + live
drives promotions and is what ``save_usage`` writes (JSON, tierserve.offload.usage):
on ``close()`` and, at request boundaries, whenever ``save_interval_s`` seconds
passed since the last save (``usage_file`` None: never saved). Metrics export the
live counts only (a Prometheus counter starting at 0 with the replica).

Request boundaries. ``at_request_boundary()`` (between engine steps) applies up to
``max_swaps`` promotions with count gain >= ``min_gain`` (tierserve.offload.promotion)
and updates ``placement``; ``promotions`` counts the swaps applied so far.

Prefetch. With ``prefetch = "previous_step"`` and a spare ring, ``before_forward`` of a
decode step (every scheduled request past its prompt) first finishes the ring's copies that
are done, then starts copying the cold experts the previous step routed to (each block's
``last_rows``) and pins them for their layer (tierserve.offload.prefetch ``plan_prefetch``);
the counters are ``spare.prefetch`` (issued / used / wasted), which ``stats()`` exports
(``ExpertMetrics.prefetch_*``; zero without a spare ring).

Closing. ``close()`` saves the usage, closes the hosts' transports and the spare ring,
and, when a launcher is attached (``launcher``: the hook was built by
``offload_from_config``, which started the hosts), shuts the hosts down. Idempotent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from tierserve.offload.host_pool import HostPool
from tierserve.offload.launcher import HostLauncher
from tierserve.offload.placement import Placement, Swap
from tierserve.offload.prefetch import plan_prefetch
from tierserve.offload.promotion import promote
from tierserve.offload.slot_ledger import PrefetchCounters
from tierserve.offload.spare_slots import SpareSlots
from tierserve.offload.usage import ExpertMetrics, ExpertUsage
from tierserve.offload.usage_hook import RouteHandle
from tierserve.step.hooks import StepHook
from tierserve.step.request_view import RequestView as Request
from tierserve.step.schedule import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class OffloadHook(StepHook):
    placement: Placement
    shards: dict[str, list[tuple[int, int]]]  # cold experts per host at offload time
    pool: HostPool
    blocks: list
    spare: SpareSlots | None
    base: list[list[int]]
    live: ExpertUsage
    recorder: RouteHandle | None = None
    launcher: HostLauncher | None = None  # started the hosts (offload_from_config): close() shuts them down
    usage_file: str | None = None
    min_gain: int = 64
    max_swaps: int = 0
    save_interval_s: float = 300.0
    prefetch: str = "none"  # "previous_step": prefetch from the previous step's routing (module doc)
    swaps: list[Swap] = field(default_factory=list)
    _last_save: float = field(default_factory=time.monotonic)
    _closed: bool = False

    @property
    def promotions(self) -> int:
        return len(self.swaps)

    def counts(self) -> list[list[int]]:
        return [[b + c for b, c in zip(brow, lrow)] for brow, lrow in zip(self.base, self.live.counts)]

    def at_request_boundary(self) -> list[Swap]:
        """Promotions by the live counts (module doc); the swaps applied. Call only between steps."""
        applied: list[Swap] = []
        if self.max_swaps:
            self.placement, applied = promote(self.blocks, self.pool, self.placement, self.counts(),
                                              self.min_gain, self.max_swaps)
            self.swaps.extend(applied)
        if self.usage_file is not None and time.monotonic() - self._last_save >= self.save_interval_s:
            self.save_usage()
        return applied

    def before_forward(self, sched: SchedulerOutput, requests: Mapping[str, Request]) -> None:
        """Prefetch for a decode step (module doc)."""
        spare = self.spare
        if self.prefetch != "previous_step" or spare is None or sched.is_empty:
            return
        if any(sr.request_id not in requests or sr.start < requests[sr.request_id].num_prompt_tokens
               for sr in sched.scheduled):
            return  # a prefill in the step: the previous routing predicts little
        for block in self.blocks:
            block.finish_done()
        previous = {b.layer: b.last_rows for b in self.blocks if b.last_rows}
        resident = {b.layer: {int(e) for e in b.experts} for b in self.blocks}
        fetch, pin = plan_prefetch(previous, resident, lambda key: self.pool.owner(key) is not None, spare.ledger)
        for key in pin:
            spare.ledger.need(key, key[0])
        for key in fetch:
            if spare.fetch(key, self.pool.transport(self.pool.owner(key)), prefetch=True) is not None:
                spare.ledger.need(key, key[0])

    def save_usage(self, path: str | None = None) -> None:
        path = path or self.usage_file
        if path is None:
            return
        usage = ExpertUsage(self.live.num_layers, self.live.num_experts)
        for layer, row in enumerate(self.counts()):
            usage.record_counts(layer, row)
        try:
            usage.save(path)
        except OSError as exc:  # a read-only model folder must not take the replica down
            logger.warning("could not save expert usage to %s: %s", path, exc)
        self._last_save = time.monotonic()

    def stats(self) -> ExpertMetrics:
        """The replica's expert metrics: live counts, resident/offloaded experts, promotions, prefetches."""
        prefetch = self.spare.prefetch if self.spare is not None else PrefetchCounters()
        return ExpertMetrics(tokens=self.live.as_metrics(), resident=self.placement.num_resident,
                             offloaded=sum(self.placement.num_experts) - self.placement.num_resident,
                             promotions=self.promotions, prefetch_issued=prefetch.issued,
                             prefetch_used=prefetch.used, prefetch_wasted=prefetch.wasted)

    def expert_metrics(self) -> ExpertMetrics:
        """Same as ``stats()`` (what the server reads today)."""
        return self.stats()

    def close(self) -> None:
        """Save the usage, close transports and the spare ring, shut down hosts it started (module doc)."""
        if self._closed:
            return
        self._closed = True
        self.save_usage()
        self.pool.close()
        if self.spare is not None:
            self.spare.close()
        if self.launcher is not None:
            self.launcher.shutdown()
