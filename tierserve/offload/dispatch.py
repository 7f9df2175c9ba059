"""OffloadedMoeBlock: a SparseMoeBlock whose cold experts live on expert hosts (fused dispatch).

Per forward (one MoE layer, one step) with tokens ``x [T, hidden]``:

1. route exactly as ``SparseMoeBlock.route`` (the same method runs on this module); with a
   spare ring, finish this layer's copies in flight that are routed now (a prefetched expert is
   never read before its copy completed) or already done, and pin the routed held slots for the
   layer (``_settle``; the pins are released when the layer returns); ``last_rows`` keeps the
   rows per expert for the next step's prefetch (tierserve.offload.prefetch);
2. plan (``plan_dispatch``, tierserve.offload.dispatch_plan: pure, over the expert ids):
   rows grouped by expert (ascending expert id, rows ascending); resident experts and
   spare-slot hits run locally; a cold expert whose rows make fetching cheaper than
   remote compute (``CostModel``, decided per layer, step and expert) is copied into a
   spare slot while the ring has a free slot; every other cold expert
   goes to its host, ONE ``HostMessage`` per host;
3. start the spare-slot fetches, then send each host's message (``x[rows // k]``, no
   padding, its experts' groups concatenated in ascending expert id, and their expert
   ids) through its transport — all messages are issued before any local compute so
   the hosts run concurrently with it;
4. compute the local experts, then collect every host's reply (``HostPool.wait``: one
   deadline; a failed host's experts are failed over and re-sent (``plan_resend``), or
   computed on the worker, until every row has an output), then finish the fetches;
5. write each expert output times its gate weight into rows ``t*k + j`` of the
   ``[T*k, hidden]`` buffer and sum the slots in slot order (``sum_slots``, the same
   code as the resident block: the plan's ``sum_order``), then add the shared expert as
   the resident block does.

Every expert sees the same rows in the same order with the same kernels wherever it
runs, and the sum order is fixed, so the output is bit-identical to all-resident.

On a GPU worker (the block's tensors moved to CUDA) the resident experts, spare slots
and experts rebuilt after a failover run on the device; the rows of each host message
go device-to-host into pinned buffers on a side stream and the replies come back
host-to-device (``DeviceRows``, tierserve.offload.device_rows). The hosts' rows are
then bit-identical to the same experts computed with the host's kernels on the
worker's CPU, and the layer equals all-resident within the dtype's rounding (the
GPU's and the CPU's kernels differ): tests/test_offload_cuda.py.
Fused-message bytes are ``rows x hidden x dtype size`` per host.

Counters (``DispatchCounters``, per block, integer adds once per expert group or host
message, never per row): ``remote_rows`` (token, slot) rows sent to hosts (re-sends
after a failover included), ``spare_rows`` rows computed in a spare slot (a hit, or
a fetch started this step), ``bytes_received`` output bytes read back from hosts
(the bytes sent are ``HostPool.stats.bytes``); benchmarks/offload.py reads them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tierserve.models.moe import SparseMoeBlock, sum_slots
from tierserve.offload.device_rows import DeviceRows
from tierserve.offload.dispatch_plan import DispatchPlan, ExpertGroup, plan_dispatch, plan_resend
from tierserve.offload.host_pool import HostPool
from tierserve.offload.spare_slots import CostModel, SpareSlots


@dataclass
class DispatchCounters:
    """Routed rows by where they ran, and host reply bytes (module doc)."""

    remote_rows: int = 0
    spare_rows: int = 0
    bytes_received: int = 0


class LayerOwners(Mapping):
    """The pool's live owners of one layer, keyed by expert id (a read-only view for the planner)."""

    def __init__(self, pool: HostPool, layer: int):
        self.pool, self.layer = pool, layer

    def __getitem__(self, e: int) -> str:
        owner = self.pool.owner((self.layer, e))
        if owner is None:
            raise KeyError(e)
        return owner

    def __iter__(self) -> Iterator[int]:
        return (e for (j, e) in self.pool.owners if j == self.layer)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _rows(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class OffloadedMoeBlock(nn.Module):
    graph_capturable = False  # the dispatch plan, host messages and spare-slot pins run on the host per layer

    def __init__(self, block: SparseMoeBlock, layer: int, resident: tuple[int, ...], pool: HostPool,
                 expert_bytes: int, spare: SpareSlots | None = None, cost: CostModel | None = None):
        super().__init__()
        self.layer = layer
        self.num_experts = block.num_experts
        self.top_k = block.top_k
        self.renormalize = block.renormalize
        self.gate = block.gate
        self.experts = nn.ModuleDict({str(e): block.experts[e] for e in resident})
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self.pool = pool
        self.expert_bytes = expert_bytes
        self.spare = spare
        self.cost = cost or CostModel()
        self.counters = DispatchCounters()
        self.moves = DeviceRows()
        self.last_rows: Counter = Counter()  # expert id -> rows routed to it by the last forward (prefetch)

    route = SparseMoeBlock.route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        t, k = ids.shape
        flat_w = weights.reshape(-1, 1)
        buf = x.new_empty(t * k, x.shape[-1])

        def put(rows: torch.Tensor, y: torch.Tensor) -> None:
            buf.index_copy_(0, rows, y * flat_w.index_select(0, rows))

        routed = ids.tolist()
        self.last_rows = Counter(e for slots in routed for e in slots)
        try:
            self._settle(self.last_rows)
            plan = self.plan(routed)
            fetches = [(g, self._start_fetch(g)) for g in plan.fetches]
            pending = self._send(plan, x)
            for g in plan.local:
                rows = _rows(g.rows, x.device)
                put(rows, self._local_module(g.expert, g.source)(x.index_select(0, rows // k)))
            self._collect(pending, plan, x, put)
            for g, future in fetches:
                module = self._finish_fetch(g.expert, future) if future is not None else None
                if module is None:  # no free slot, or its host died while copying: the pool moved the expert
                    self._run_groups([g], x, put)
                else:
                    rows = _rows(g.rows, x.device)
                    put(rows, module(x.index_select(0, rows // k)))
        finally:
            if self.spare is not None:
                self.spare.ledger.release_layer(self.layer)
        out = sum_slots(buf, t, k)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def finish_done(self) -> None:
        """Finish this layer's copies in flight that have completed (between steps; waits for none)."""
        if self.spare is not None:
            for (_, e), future in self.spare.pending(self.layer):
                if future.done():
                    self._finish_fetch(e, future)

    def _settle(self, routed: Counter) -> None:
        """Before planning: finish this layer's copies in flight that are routed now (waiting for them: a slot is
        never read before its copy completed) or already done, then pin the routed held slots for this layer
        so that this layer's own fetches cannot evict them."""
        spare = self.spare
        if spare is None:
            return
        for (_, e), future in spare.pending(self.layer):
            if e in routed or future.done():
                self._finish_fetch(e, future)
        for e in routed:
            if (self.layer, e) in spare:
                spare.ledger.need((self.layer, e), self.layer)

    # ------------------------------------------------------------------ planning
    def plan(self, expert_ids: list[list[int]]) -> DispatchPlan:
        """This layer's ``DispatchPlan`` for the routed ids, from the live placement, ring and cost model."""
        spare = self.spare
        held = {e for (j, e) in spare.keys() if j == self.layer} if spare is not None else ()
        prefer = None
        if spare is not None:
            budget = [spare.free_slots()]  # fetches beyond the free slots are sent to their hosts

            def prefer(n: int) -> bool:
                if budget[0] > 0 and self.cost.prefer_fetch(n, self.expert_bytes):
                    budget[0] -= 1
                    return True
                return False
        plan = plan_dispatch(self.layer, expert_ids, self.num_experts, {int(e) for e in self.experts},
                             LayerOwners(self.pool, self.layer), held, prefer)
        self.counters.spare_rows += sum(len(g.rows) for g in plan.local if g.source == "spare")
        self.counters.spare_rows += sum(len(g.rows) for g in plan.fetches)
        return plan

    def _local_module(self, e: int, source: str) -> nn.Module:
        if source == "resident":
            return self.experts[str(e)]
        if source == "spare":
            return self.spare.get((self.layer, e))  # a hit: moves the slot to the ring's end
        return self.pool.local[(self.layer, e)]

    def _start_fetch(self, g: ExpertGroup) -> Future | None:
        key = (self.layer, g.expert)
        return self.spare.fetch(key, self.pool.transport(self.pool.owner(key)))

    # ------------------------------------------------------------------ remote
    def _send(self, plan: DispatchPlan, x: torch.Tensor):
        pending = {}
        self.pool.stats.last[self.layer] = []
        host_rows = self.moves.to_host(x, [msg.tokens for msg in plan.messages])
        for msg, xs in zip(plan.messages, host_rows):
            dtype = str(x.dtype).removeprefix("torch.")
            pending[msg.host] = self.pool.submit(msg.host, self.layer, xs, np.array(msg.expert_ids, dtype=np.int64),
                                                 dtype)
            self.pool.stats.last[self.layer].append((msg.host, len(msg.tokens)))
            self.counters.remote_rows += len(msg.tokens)
        return pending

    def _collect(self, pending, plan: DispatchPlan, x: torch.Tensor, put) -> None:
        results = self.pool.wait(pending)
        for msg in plan.messages:
            y = results.get(msg.host)
            if y is None:
                self._run_groups(list(msg.groups), x, put)
                continue
            self._scatter(y, msg.groups, x, put)

    def _scatter(self, y, groups, x: torch.Tensor, put) -> None:
        """One host's reply (its groups' rows stacked in message order) back to the groups' rows."""
        self.counters.bytes_received += int(y.nbytes)
        y = self.moves.to_device(y, x.dtype, x.device)
        start = 0
        for g in groups:
            put(_rows(g.rows, x.device), y[start:start + len(g.rows)])
            start += len(g.rows)

    def _run_groups(self, groups: list[ExpertGroup], x: torch.Tensor, put) -> None:
        """Re-dispatch groups after a failover (new owners, or local); repeats until all are done."""
        k = self.top_k
        while groups:
            plan = plan_resend(self.layer, groups, LayerOwners(self.pool, self.layer), k)
            for g in plan.local:
                rows = _rows(g.rows, x.device)
                put(rows, self.pool.local[(self.layer, g.expert)](x.index_select(0, rows // k)))
            results = self.pool.wait(self._send(plan, x))
            groups = []
            for msg in plan.messages:
                y = results.get(msg.host)
                if y is None:
                    groups.extend(msg.groups)
                    continue
                self._scatter(y, msg.groups, x, put)

    def _finish_fetch(self, e: int, future: Future) -> nn.Module | None:
        key = (self.layer, e)
        owner = self.pool.owner(key)
        try:
            return self.spare.finish(key, future, self.pool.timeout_s)
        except Exception as exc:  # the copy failed: its host is dead or too slow
            if owner is not None:
                self.pool.fail(owner, f"spare-slot fetch: {type(exc).__name__}")
            return None
