"""ExpertHost: a Ray actor holding cold MoE experts in its node's CPU RAM.

One per node: it requires the custom resource ``expert_host`` (amount 1) and each
node advertises ``{"expert_host": 1}``, so Ray places at most one host per node. It
takes no CPU slot (``num_cpus=0``): it only runs when the worker calls it.

``compute(layer, x, expert_ids)`` is the fused dispatch target: ``x`` [n, hidden]
holds only the (token, slot) rows routed to this host's experts in ``layer`` and
``expert_ids`` [n] their experts. Rows are grouped by expert with a stable sort
(the worker already sends them grouped in ascending expert order), each expert runs
once on its rows (``index_select``: the same contiguous shape the worker would use)
and the un-gated outputs come back as one [n, hidden] array in the input row
order; the worker applies the router weights. Experts are built by
``tierserve.moe.expert_weights.build_expert`` with the worker's linear backend, so
outputs are bit-identical to the worker running the expert itself.

``open_channel()`` starts a direct TCP channel to ``compute`` on this node's IP
(``tierserve.moe.socket_channel``: a faster path than an actor call for the per-layer
round trip) and returns its ``(ip, port, token)``; the worker connects once, presenting the token.

Every expert of the model sits on some host (the hosts are the at-rest store; the
worker's resident experts have a standby copy here for promotions), so ``load_experts``
only stores the weights and an expert's module is built on its first ``compute``
(standby copies never called cost only their weight bytes).

Weights at rest sit in an ``ExpertStore`` (tierserve.moe.host_storage) chosen by
``weight_format``: ``"raw"`` arrays or ``"dfloat11"`` (lossless bf16 coding, decoded
when the expert's module is built); ``stats()["weight_bytes"]`` / ``["raw_weight_bytes"]``
report the bytes held at rest and what plain arrays would take.

What crosses the wire (tierserve.moe.expert_transit): ``get_expert_payload(layer, e)``
returns the expert as held, raw ``ExpertWeights`` on a ``"raw"`` host and the stored
``CodedExpert`` (no re-encoding) on a ``"dfloat11"`` host; the worker decodes it
(``fetch_expert``: spare-slot fills, promotions, the cost model's probe).
``load_experts`` accepts either form per expert: a coded expert sent to a
``"dfloat11"`` host is stored as is, raw arrays are coded on arrival (the initial
shipping), and a coded expert sent to a ``"raw"`` host is decoded. ``weight_format()``
names the store (failover reloads ask it to send the target's own form).

``stats()`` reports the calls and bytes received per layer (tests check the fused
dispatch contract: one message per host per layer per step, bytes = rows x hidden
x dtype size).
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch

from tierserve.moe.expert_transit import ExpertPayload
from tierserve.moe.expert_weights import build_expert, numpy_to_tensor, tensor_to_numpy
from tierserve.moe.host_storage import make_store
from tierserve.moe.socket_channel import start_server

#: Custom resource every expert-host node advertises with amount 1.
EXPERT_HOST_RESOURCE = "expert_host"


@ray.remote(num_cpus=0, resources={EXPERT_HOST_RESOURCE: 1}, max_restarts=0)
class ExpertHost:
    def __init__(self, linear_backend: str = "auto", num_threads: int | None = None, weight_format: str = "raw"):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.linear_backend = linear_backend
        self._experts: dict[tuple[int, int], torch.nn.Module] = {}
        self._weights = make_store(weight_format)
        self._calls: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def load_experts(self, experts: dict[tuple[int, int], ExpertPayload]) -> int:
        """Hold ``experts`` ((layer, expert) -> raw or coded payload); returns how many this host now holds."""
        for key, w in experts.items():
            self._weights.put(key, w)
            self._experts.pop(key, None)  # rebuilt from the new weights on first use
        return len(self._weights.keys())

    def weight_format(self) -> str:
        """The at-rest (and wire) format of this host's experts: a ``HOST_WEIGHT_FORMATS`` name."""
        return self._weights.name

    def get_expert_payload(self, layer: int, expert: int) -> ExpertPayload:
        """One held expert as stored: raw arrays or its ``CodedExpert`` (module doc); the receiver decodes."""
        return self._weights.payload((layer, expert))

    def open_channel(self) -> tuple[str, int, str]:
        """Serve ``compute`` on a TCP socket (one authenticated connection); returns (ip, port, token)."""
        return start_server(ray.util.get_node_ip_address(), self.compute)

    def held(self) -> list[tuple[int, int]]:
        return sorted(self._weights.keys())

    def _expert(self, layer: int, e: int) -> torch.nn.Module:
        expert = self._experts.get((layer, e))
        if expert is None:
            if (layer, e) not in self._weights:
                raise KeyError(f"expert host on node {self.ping()} does not hold expert (layer {layer}, {e})")
            expert = self._experts[(layer, e)] = build_expert(self._weights.get((layer, e)), self.linear_backend)
        return expert

    @torch.inference_mode()
    def compute(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
        self._calls[layer] = self._calls.get(layer, 0) + 1
        self._bytes[layer] = self._bytes.get(layer, 0) + int(x.nbytes)
        xt = numpy_to_tensor(x, getattr(torch, dtype))
        ids = torch.from_numpy(np.array(expert_ids, dtype=np.int64))
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order].tolist()
        out = torch.empty_like(xt)
        start = 0
        while start < len(sorted_ids):
            e = sorted_ids[start]
            end = start
            while end < len(sorted_ids) and sorted_ids[end] == e:
                end += 1
            rows = order[start:end]
            expert = self._expert(layer, e)
            out.index_copy_(0, rows, expert(xt.index_select(0, rows)))
            start = end
        return tensor_to_numpy(out)

    def stats(self) -> dict:
        return {"calls": dict(self._calls), "bytes": dict(self._bytes), "pid": os.getpid(),
                "weight_bytes": self._weights.nbytes, "raw_weight_bytes": self._weights.raw_nbytes}

    def reset_stats(self) -> None:
        self._calls.clear()
        self._bytes.clear()
