"""ExpertHostCore: what an expert host does, independent of how it runs (plain process or Ray actor).

An expert host holds cold MoE experts in its machine's CPU RAM and computes them for
the worker. It runs as a plain process serving the socket channel
(tierserve.offload.host_process, started by ``ProcessHostLauncher``) or inside the Ray
actor of tierserve/actors/expert_host.py, which serves the same channel on its node;
both wrap this class.

``compute(layer, x, expert_ids, dtype)`` is the fused dispatch target: ``x`` [n, hidden]
holds only the (token, slot) rows routed to this host's experts in ``layer`` and
``expert_ids`` [n] their experts. Rows are grouped by expert with a stable sort
(the worker already sends them grouped in ascending expert order), each expert runs
once on its rows (``index_select``: the same contiguous shape the worker would use)
and the un-gated outputs come back as one [n, hidden] array in the input row
order; the worker applies the router weights. Experts are built by
``tierserve.offload.expert_weights.build_expert`` with the worker's linear backend, so
outputs are bit-identical to the worker running the expert itself.

Every expert of the model sits on some host (the hosts are the at-rest store; the
worker's resident experts have a standby copy here for promotions), so ``load_experts``
only stores the weights and an expert's module is built on its first ``compute``
(standby copies never called cost only their weight bytes).

Weights at rest sit in an ``ExpertStore`` (tierserve.offload.host_storage) chosen by
``weight_format``: ``"raw"`` arrays or ``"dfloat11"`` (lossless bf16 coding, decoded
when the expert's module is built); ``stats().weight_bytes`` / ``.raw_weight_bytes``
report the bytes held at rest and what plain arrays would take.

What crosses the wire (tierserve.offload.expert_transit): ``get_expert_payload(layer, e)``
returns the expert as held, raw ``ExpertWeights`` on a ``"raw"`` host and the stored
``CodedExpert`` (no re-encoding) on a ``"dfloat11"`` host; the worker decodes it.
``load_experts`` accepts either form per expert: a coded expert sent to a
``"dfloat11"`` host is stored as is, raw arrays are coded on arrival (the initial
shipping), and a coded expert sent to a ``"raw"`` host is decoded. ``weight_format()``
names the store (failover reloads ask it to send the target's own form).

Bad requests: rows for an expert the host does not hold raise ``KeyError``, rows whose
width is not the expert's hidden size raise ``InvalidParameterError`` (field ``x``), both
naming the host's node and the expert, before any row is computed for that expert; the
socket channel returns the message to the worker as an error reply (the connection and
the host keep serving), and the worker's ``HostPool`` fails the host over
(tests/test_expert_host_errors.py).

``stats()`` reports the calls and bytes received per layer (tests check the fused
dispatch contract: one message per host per layer per step, bytes = rows x hidden
x dtype size). The channel serves several connections at once (the worker's dispatch
connection and its control connection for loads and copies), so the store and the
built modules are guarded by one lock; expert compute itself runs outside it.
"""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import torch

from tierserve.errors import InvalidParameterError
from tierserve.offload.expert_transit import ExpertPayload
from tierserve.offload.expert_weights import build_expert, numpy_to_tensor, tensor_to_numpy
from tierserve.offload.host_storage import make_store
from tierserve.offload.transport import HostStats

Key = tuple[int, int]


class ExpertHostCore:
    """One expert host's experts, counters and fused compute (module doc)."""

    def __init__(self, linear_backend: str = "auto", num_threads: int | None = None, weight_format: str = "raw",
                 node: str | None = None):
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.linear_backend = linear_backend
        self.node = node or socket.gethostname()
        self._experts: dict[Key, torch.nn.Module] = {}
        self._hidden: dict[Key, int] = {}  # input features of each built expert
        self._weights = make_store(weight_format)
        self._calls: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._lock = threading.Lock()

    def load_experts(self, experts: dict[Key, ExpertPayload]) -> int:
        """Hold ``experts`` ((layer, expert) -> raw or coded payload); returns how many this host now holds."""
        with self._lock:
            for key, w in experts.items():
                self._weights.put(tuple(key), w)
                self._experts.pop(tuple(key), None)  # rebuilt from the new weights on first use
            return len(self._weights.keys())

    def weight_format(self) -> str:
        """The at-rest (and wire) format of this host's experts: a ``HOST_WEIGHT_FORMATS`` name."""
        return self._weights.name

    def get_expert_payload(self, layer: int, expert: int) -> ExpertPayload:
        """One held expert as stored: raw arrays or its ``CodedExpert`` (module doc); the receiver decodes."""
        with self._lock:
            if (layer, expert) not in self._weights:
                raise KeyError(f"expert host on {self.node} does not hold expert (layer {layer}, {expert})")
            return self._weights.payload((layer, expert))

    def held(self) -> list[Key]:
        with self._lock:
            return sorted(self._weights.keys())

    def _expert(self, layer: int, e: int, hidden: int) -> torch.nn.Module:
        """The built module of expert ``(layer, e)``, checked to take rows of ``hidden`` features."""
        with self._lock:
            expert = self._experts.get((layer, e))
            if expert is None:
                if (layer, e) not in self._weights:
                    raise KeyError(f"expert host on {self.node} does not hold expert (layer {layer}, {e})")
                w = self._weights.get((layer, e))
                expert = build_expert(w, self.linear_backend)
                self._experts[(layer, e)] = expert
                self._hidden[(layer, e)] = int(w.gate_up.shape[1])
            if hidden != self._hidden[(layer, e)]:
                raise InvalidParameterError("x", f"expert host on {self.node}: rows of hidden size {hidden}, but "
                                                 f"expert (layer {layer}, {e}) takes {self._hidden[(layer, e)]}")
            return expert

    @torch.inference_mode()
    def compute(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
        with self._lock:
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
            out.index_copy_(0, rows, self._expert(layer, e, xt.shape[1])(xt.index_select(0, rows)))
            start = end
        return tensor_to_numpy(out)

    def stats(self) -> HostStats:
        with self._lock:
            return HostStats(calls=dict(self._calls), bytes=dict(self._bytes), pid=os.getpid(),
                             weight_bytes=self._weights.nbytes, raw_weight_bytes=self._weights.raw_nbytes,
                             node=self.node)

    def reset_stats(self) -> None:
        with self._lock:
            self._calls.clear()
            self._bytes.clear()
