"""NaiveMoeBlock: the per-expert remote-call baseline of expert offload (for benchmarks/offload.py).

What a straightforward offload does, kept as a real dispatch mode so the fused
dispatcher (tierserve.offload.dispatch) can be measured against it. Per forward (one
MoE layer, one step) with tokens ``x [T, hidden]``:

1. route exactly as ``SparseMoeBlock.route``;
2. walk the experts with routed rows in ascending expert id (``group_rows`` of
   tierserve.offload.dispatch_plan); a
   resident expert (or one the pool rebuilt on the worker after a failover) runs
   locally; every other expert gets ITS OWN blocking remote call to its host
   (``HostPool.submit`` + ``HostPool.wait`` of one message holding only that expert's
   rows): no fusion per host, no overlap with local compute, no spare-slot cache (the
   ring, if any, is neither read nor filled);
3. gate, place and sum the slots exactly as ``OffloadedMoeBlock`` does.

Every expert sees the same rows in the same order with the same kernels, so the
output is bit-identical to all-resident (tests/test_expert_naive.py). Placement is
whatever the handle was built with; the benchmark's baseline ranks experts by id
(no usage file). A failed call is failed over by the pool and re-dispatched with
``OffloadedMoeBlock._run_groups``. Counters are the parent's ``DispatchCounters``
(``remote_rows``, ``bytes_received``); ``HostPool.stats.messages`` counts one message
per (layer, remote expert with rows) per step.

``use_naive_dispatch(handle)`` switches every block of an ``OffloadHook`` to this
forward in place (the class of each block is replaced by this subclass, which adds
no state), so the usage recorder and the handle's bookkeeping stay attached.
"""

from __future__ import annotations

import torch

from tierserve.errors import InvalidParameterError
from tierserve.models.moe import sum_slots
from tierserve.offload.dispatch import OffloadedMoeBlock
from tierserve.offload.dispatch_plan import group_rows
from tierserve.offload.expert_weights import numpy_to_tensor, tensor_to_numpy


class NaiveMoeBlock(OffloadedMoeBlock):
    """One blocking host call per (layer, cold expert with routed rows); see module doc."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        t, k = ids.shape
        flat_w = weights.reshape(-1, 1)
        buf = x.new_empty(t * k, x.shape[-1])
        dtype = str(x.dtype).removeprefix("torch.")

        def put(rows: torch.Tensor, y: torch.Tensor) -> None:
            buf.index_copy_(0, rows, y * flat_w.index_select(0, rows))

        for group in group_rows(ids.tolist(), self.num_experts):
            e, rows = group.expert, torch.tensor(group.rows, dtype=torch.long)
            key = (self.layer, e)
            module = self.experts[str(e)] if str(e) in self.experts else self.pool.local.get(key)
            if module is not None:
                put(rows, module(x.index_select(0, rows // k)))
                continue
            owner = self.pool.owner(key)
            xs = tensor_to_numpy(x.index_select(0, rows // k))
            eids = torch.full((len(rows),), e, dtype=torch.long).numpy()
            self.counters.remote_rows += len(rows)
            y = self.pool.wait({owner: self.pool.submit(owner, self.layer, xs, eids, dtype)}).get(owner)
            if y is None:  # the host failed and was failed over: re-dispatch to the new owner
                self._run_groups([group], x, put)
                continue
            self.counters.bytes_received += int(y.nbytes)
            put(rows, numpy_to_tensor(y, x.dtype))
        out = sum_slots(buf, t, k)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def use_naive_dispatch(handle) -> None:
    """Switch every ``OffloadedMoeBlock`` of ``handle`` (an OffloadHook) to the naive forward, in place."""
    for block in handle.blocks:
        if not isinstance(block, OffloadedMoeBlock):
            raise InvalidParameterError("handle", f"blocks must be OffloadedMoeBlock, got {type(block).__name__}")
        block.__class__ = NaiveMoeBlock
