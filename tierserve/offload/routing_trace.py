"""Routing traces: record which experts real text routes each token to, replay them on another MoE.

A random-weight model routes near-uniformly, with no hot experts and no
temporal locality, so an offload benchmark on it measures the wrong workload.
A :class:`RoutingTrace` holds, per MoE layer ``j``, the top-k expert ids of
every token in the order tokens passed the layer (``layers[j][t]``, slot order
as routed). It is small (JSON of ints) and is recorded once on a real MoE
(the MoEfied SmolLM2 on Austen's text: benchmarks/routing_trace.py).

Recording: ``record_routing(model)`` wraps ``route`` of every routed block
(an instance attribute, as tierserve.offload.usage_hook does, so it composes
with the usage recorder) and appends each forward's ids; ``detach()`` restores.

Mapping onto a larger MoE (``map_by_rank``, pure Python): target layer ``j``
reads source layer ``j mod L_s``. Source experts are ranked per layer by
``(-count, id)``; with ``m = E_t // E_s`` the source expert of rank ``r`` owns
the target experts ``r*m .. r*m + m - 1`` (target id = popularity rank, which
is arbitrary on random weights). A token whose source ids are ``S`` (slot
order) takes, for each source id ``e`` in ``S``, ``q = ceil(k_t / k_s)``
experts of ``e``'s block at offsets ``(h + i) mod m`` for ``i < q``, with ``h =
crc32(sorted S) mod m``; the first ``k_t`` distinct ids are its target ids. So
a routing pattern that repeats maps to the same target experts (temporal
locality kept), popular source experts give popular target blocks (skew
kept), and different patterns spread over all of a block (every target expert
reachable). Requires ``E_t >= E_s``, ``k_t <= E_t`` and ``m * k_s >= k_t``.

Replay: ``replay_routing(model, trace)`` makes every routed block take its ids
from the trace: a forward of ``T`` tokens takes the next ``T`` rows of its
layer (a cursor per layer, wrapping around), and its weights are the router's
own softmax probabilities at those ids (renormalised when the block
renormalises), so the expert outputs are mixed as the model would.
Tests: tests/test_routing_trace.py.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import torch

from tierserve.errors import InvalidParameterError
from tierserve.offload.usage_hook import RouteHandle, routed_blocks


@dataclass
class RoutingTrace:
    num_experts: int
    top_k: int
    layers: list[list[list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return min((len(rows) for rows in self.layers), default=0)

    def counts(self, layer: int) -> list[int]:
        out = [0] * self.num_experts
        for row in self.layers[layer]:
            for e in row:
                out[e] += 1
        return out

    def ranking(self, layer: int) -> list[int]:
        """Expert ids of ``layer`` by (-count, id)."""
        c = self.counts(layer)
        return sorted(range(self.num_experts), key=lambda e: (-c[e], e))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"num_experts": self.num_experts, "top_k": self.top_k, "layers": self.layers}, f,
                      separators=(",", ":"))

    @classmethod
    def load(cls, path: str) -> "RoutingTrace":
        with open(path) as f:
            data = json.load(f)
        trace = cls(int(data["num_experts"]), int(data["top_k"]), data["layers"])
        for j, rows in enumerate(trace.layers):
            for row in rows:
                if len(row) != trace.top_k or not all(0 <= e < trace.num_experts for e in row):
                    raise InvalidParameterError("trace", f"{path}: layer {j} has a row {row} that is not "
                                                         f"{trace.top_k} ids in [0, {trace.num_experts})")
        return trace


def _wrap(model: torch.nn.Module, make) -> RouteHandle:
    blocks = routed_blocks(model)
    previous = []
    for layer, block in enumerate(blocks):
        previous.append(block.__dict__.get("route"))
        block.route = make(layer, block, block.route)
    return RouteHandle(blocks, previous)


def record_routing(model: torch.nn.Module) -> tuple[RoutingTrace, RouteHandle]:
    """A trace that fills as the model runs, and the handle that stops recording (module doc)."""
    blocks = routed_blocks(model)
    if not blocks:
        raise InvalidParameterError("model", "has no MoE layers to record routing from")
    trace = RoutingTrace(blocks[0].num_experts, blocks[0].top_k, [[] for _ in blocks])

    def make(layer, block, original):
        def route(x):
            weights, ids = original(x)
            trace.layers[layer].extend(ids.tolist())
            return weights, ids
        return route

    return trace, _wrap(model, make)


def map_by_rank(source: RoutingTrace, num_experts: int, top_k: int, num_layers: int) -> RoutingTrace:
    """``source`` mapped onto a MoE of ``num_layers`` x ``num_experts`` experts, top ``top_k`` (module doc)."""
    m = num_experts // source.num_experts
    if m < 1 or top_k > num_experts or m * source.top_k < top_k or not source.layers:
        raise InvalidParameterError("num_experts", f"cannot map {source.num_experts} experts top-{source.top_k} "
                                                   f"onto {num_experts} experts top-{top_k}")
    q = math.ceil(top_k / source.top_k)
    out = RoutingTrace(num_experts, top_k, [])
    for j in range(num_layers):
        src = j % len(source.layers)
        rank = {e: r for r, e in enumerate(source.ranking(src))}
        rows = []
        for row in source.layers[src]:
            h = zlib.crc32(",".join(map(str, sorted(row))).encode()) % m
            ids: list[int] = []
            for e in row:
                for i in range(q):
                    t = rank[e] * m + (h + i) % m
                    if t not in ids:
                        ids.append(t)
            rows.append(ids[:top_k])
        out.layers.append(rows)
    return out


def replay_routing(model: torch.nn.Module, trace: RoutingTrace) -> RouteHandle:
    """Route every MoE block of ``model`` by ``trace`` (module doc)."""
    blocks = routed_blocks(model)
    if len(blocks) > len(trace.layers) or any(b.num_experts != trace.num_experts or b.top_k != trace.top_k
                                              for b in blocks):
        raise InvalidParameterError("trace", f"covers {len(trace.layers)} layers x {trace.num_experts} experts "
                                             f"top-{trace.top_k}; the model has {len(blocks)} MoE layers x "
                                             f"{blocks[0].num_experts if blocks else 0} experts")
    cursor = [0] * len(blocks)

    def make(layer, block, original):
        rows = trace.layers[layer]

        def route(x):
            n, at = x.shape[0], cursor[layer]
            ids = torch.tensor([rows[(at + i) % len(rows)] for i in range(n)], dtype=torch.long, device=x.device)
            cursor[layer] = (at + n) % len(rows)
            probs = torch.softmax(block.gate(x).float(), dim=-1).gather(1, ids)
            if block.renormalize:
                probs = probs / probs.sum(dim=-1, keepdim=True)
            return probs.to(x.dtype), ids
        return route

    return _wrap(model, make)
