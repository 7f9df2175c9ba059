"""OffloadedMoeBlock: a SparseMoeBlock whose cold experts live on expert hosts (fused dispatch).

Per forward (one MoE layer, one step) with tokens ``x [T, hidden]``:

1. route exactly as ``SparseMoeBlock.route`` (the same method runs on this module);
2. group the ``T*k`` (token, slot) rows by expert (``expert_rows``: stable, ascending
   expert id) and by owner: resident experts and spare-slot hits run locally; a cold
   expert whose rows make fetching cheaper than remote compute (``CostModel``) is
   copied into a spare slot; every other cold expert goes to its host;
3. start the spare-slot fetches, then send ONE message per host holding only that
   host's rows (``x[rows // k]``, no padding; its experts' groups concatenated in
   ascending expert id) and their expert ids — all messages are issued before any
   local compute so the hosts run concurrently with it;
4. compute the local experts, then collect every host's reply (``HostPool.wait``: one
   deadline; a failed host's experts are failed over and re-sent, or computed on the
   worker, until every row has an output), then finish the fetches;
5. write each expert output times its gate weight into rows ``t*k + j`` of the
   ``[T*k, hidden]`` buffer and sum the slots in slot order (``sum_slots``, the same
   code as the resident block), then add the shared expert as the resident block does.

Every expert sees the same rows in the same order with the same kernels wherever it
runs, and the sum order is fixed, so the output is bit-identical to all-resident.
Fused-message bytes are ``rows x hidden x dtype size`` per host.

Counters (``DispatchCounters``, per block, integer adds once per expert group or host
message, never per row): ``remote_rows`` (token, slot) rows sent to hosts (re-sends
after a failover included), ``spare_rows`` rows computed in a spare slot (a hit, or
a fetch started this step), ``bytes_received`` output bytes read back from hosts
(the bytes sent are ``HostPool.stats.bytes``); benchmarks/offload.py reads them.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from tierserve.models.moe import SparseMoeBlock, expert_rows, sum_slots
from tierserve.moe.expert_weights import tensor_to_numpy, numpy_to_tensor
from tierserve.moe.host_pool import HostPool
from tierserve.moe.spare_slots import CostModel, SpareSlots

Group = tuple[int, torch.Tensor]  # (expert id, rows t*k + j)


@dataclass
class DispatchCounters:
    """Routed rows by where they ran, and host reply bytes (module doc)."""

    remote_rows: int = 0
    spare_rows: int = 0
    bytes_received: int = 0


class OffloadedMoeBlock(nn.Module):
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

    route = SparseMoeBlock.route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        t, k = ids.shape
        flat_w = weights.reshape(-1, 1)
        buf = x.new_empty(t * k, x.shape[-1])

        def put(rows: torch.Tensor, y: torch.Tensor) -> None:
            buf.index_copy_(0, rows, y * flat_w.index_select(0, rows))

        local, remote, fetches = self._plan(expert_rows(ids, self.num_experts))
        pending = self._send(remote, x, k)
        for module, rows in local:
            put(rows, module(x.index_select(0, rows // k)))
        self._collect(pending, remote, x, k, put)
        for (e, rows), future in fetches:
            module = self._finish_fetch(e, future)
            if module is None:  # its host died while copying: the pool moved the expert
                self._run_groups([(e, rows)], x, k, put)
            else:
                put(rows, module(x.index_select(0, rows // k)))
        out = sum_slots(buf, t, k)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    # ------------------------------------------------------------------ planning
    def _plan(self, groups: list[Group]):
        local: list[tuple[nn.Module, torch.Tensor]] = []
        remote: dict[str, list[Group]] = {}
        fetches: list[tuple[Group, Future]] = []
        for e, rows in groups:
            key = (self.layer, e)
            if str(e) in self.experts:
                local.append((self.experts[str(e)], rows))
                continue
            owner = self.pool.owner(key)
            slot = self.spare.get(key) if self.spare is not None else None
            if slot is not None:
                local.append((slot, rows))
                self.counters.spare_rows += len(rows)
            elif owner is None:
                local.append((self.pool.local[key], rows))
            elif self.spare is not None and self.cost.prefer_fetch(len(rows), self.expert_bytes):
                fetches.append(((e, rows), self.spare.fetch(key, self.pool.handle(owner))))
                self.counters.spare_rows += len(rows)
            else:
                remote.setdefault(owner, []).append((e, rows))
        return local, remote, fetches

    # ------------------------------------------------------------------ remote
    def _send(self, remote: dict[str, list[Group]], x: torch.Tensor, k: int):
        pending = {}
        self.pool.stats.last[self.layer] = []
        for host, groups in remote.items():
            rows = torch.cat([r for _, r in groups])
            eids = torch.cat([torch.full((len(r),), e, dtype=torch.long) for e, r in groups])
            xs = tensor_to_numpy(x.index_select(0, rows // k))
            dtype = str(x.dtype).removeprefix("torch.")
            pending[host] = self.pool.submit(host, self.layer, xs, eids.numpy(), dtype)
            self.pool.stats.last[self.layer].append((host, len(rows)))
            self.counters.remote_rows += len(rows)
        return pending

    def _collect(self, pending, remote: dict[str, list[Group]], x: torch.Tensor, k: int, put) -> None:
        results = self.pool.wait(pending)
        for host, groups in remote.items():
            y = results.get(host)
            if y is None:
                self._run_groups(groups, x, k, put)
                continue
            self._scatter(y, groups, x, put)

    def _scatter(self, y, groups: list[Group], x: torch.Tensor, put) -> None:
        """One host's reply (its groups' rows stacked in message order) back to the groups' rows."""
        self.counters.bytes_received += int(y.nbytes)
        y = numpy_to_tensor(y, x.dtype)
        start = 0
        for _, rows in groups:
            put(rows, y[start:start + len(rows)])
            start += len(rows)

    def _run_groups(self, groups: list[Group], x: torch.Tensor, k: int, put) -> None:
        """Re-dispatch groups after a failover (new owners, or local); repeats until all are done."""
        while groups:
            remote: dict[str, list[Group]] = {}
            for e, rows in groups:
                owner = self.pool.owner((self.layer, e))
                if owner is None:
                    put(rows, self.pool.local[(self.layer, e)](x.index_select(0, rows // k)))
                else:
                    remote.setdefault(owner, []).append((e, rows))
            results = self.pool.wait(self._send(remote, x, k))
            groups = []
            for host, hg in remote.items():
                y = results.get(host)
                if y is None:
                    groups.extend(hg)
                    continue
                self._scatter(y, hg, x, put)

    def _finish_fetch(self, e: int, future: Future) -> nn.Module | None:
        key = (self.layer, e)
        owner = self.pool.owner(key)
        try:
            return self.spare.finish(key, future, self.pool.timeout_s)
        except Exception as exc:  # the copy failed: its host is dead or too slow
            if owner is not None:
                self.pool.fail(owner, f"spare-slot fetch: {type(exc).__name__}")
            return None
