"""ExpertHost: the Ray actor form of an expert host — a thin wrapper around ``ExpertHostCore``.

One per node: it requires the custom resource ``expert_host`` (amount 1) and each
node advertises ``{"expert_host": 1}``, so Ray places at most one host per node. It
takes no CPU slot (``num_cpus=0``): it only runs when the worker calls it.

Everything an expert host does (fused compute, holding experts at rest, copying one
out, stats) is ``tierserve.offload.expert_host.ExpertHostCore``, the same class a
plain-process host (tierserve.offload.host_process) serves. ``open_channel()`` starts
that same socket server (tierserve.offload.socket_channel) on this node's IP and
returns ``(ip, port, hex token)``; the token travels over this authenticated Ray call.
The remaining methods forward to the core one to one, for the ``"ray"`` channel
(tierserve/actors/ray_transport.py: fused calls as plain actor calls).
"""

from __future__ import annotations

import numpy as np
import ray

from tierserve.offload.expert_host import ExpertHostCore
from tierserve.offload.expert_transit import ExpertPayload
from tierserve.offload.socket_channel import start_server
from tierserve.offload.transport import HostStats

#: Custom resource every expert-host node advertises with amount 1.
EXPERT_HOST_RESOURCE = "expert_host"


@ray.remote(num_cpus=0, resources={EXPERT_HOST_RESOURCE: 1}, max_restarts=0)
class ExpertHost:
    def __init__(self, linear_backend: str = "auto", num_threads: int | None = None, weight_format: str = "raw"):
        self.core = ExpertHostCore(linear_backend, num_threads, weight_format,
                                   node=ray.get_runtime_context().get_node_id())

    def ping(self) -> str:
        return self.core.node

    def open_channel(self) -> tuple[str, int, str]:
        """Serve the core on a TCP socket on this node's IP; returns (ip, port, token)."""
        return start_server(ray.util.get_node_ip_address(), self.core)

    def load_experts(self, experts: dict[tuple[int, int], ExpertPayload]) -> int:
        return self.core.load_experts(experts)

    def weight_format(self) -> str:
        return self.core.weight_format()

    def get_expert_payload(self, layer: int, expert: int) -> ExpertPayload:
        return self.core.get_expert_payload(layer, expert)

    def held(self) -> list[tuple[int, int]]:
        return self.core.held()

    def compute(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
        return self.core.compute(layer, x, expert_ids, dtype)

    def stats(self) -> HostStats:
        return self.core.stats()

    def reset_stats(self) -> None:
        self.core.reset_stats()
