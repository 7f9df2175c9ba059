"""apply_expert_offload: the transform that moves a built MoE model's cold experts to expert hosts.

``apply_expert_offload(model, placement, hosts)``:

1. finds the model's ``SparseMoeBlock`` layers; placement layer ``j`` is the j-th MoE
   block in model order (dense layers of e.g. Qwen2-MoE ``mlp_only_layers`` are skipped);
2. shards the cold experts over the hosts (``placement.shard_cold``, balanced by bytes
   then per-layer traffic when ``counts`` are given), ships each host its experts'
   weights (numpy, one ``load_experts`` call per host, all in flight together);
3. records where each cold expert sits in the checkpoint (``CheckpointExperts``, when
   ``model_path`` is a safetensors folder) so a dead host's experts can be re-read;
4. connects the fused-dispatch channel to every host: ``channel="socket"`` (default)
   opens a direct TCP socket per host (``ExpertHost.open_channel``; ~0.3 ms instead of
   ~1.3 ms per round trip, measured in benchmarks/offload.py), ``"ray"`` keeps plain
   actor calls; the Ray path is always kept for loading, copies and failover;
5. replaces every block by an :class:`OffloadedMoeBlock` holding only its resident
   experts: the cold experts' tensors are dropped from the worker.

It must run BEFORE the linear-backend transform (it reads plain ``nn.Linear``
weights); hosts apply the same ``linear_backend`` name, so the engine's later
``apply_linear_backend(model, name)`` packs the resident experts with identical kernels.

``start_expert_hosts(n)`` starts ``n`` :class:`ExpertHost` actors (one per node carrying
the ``expert_host`` resource) and waits until all answer ``ping`` within ``timeout_s``.
``offload_from_config`` is what ``LLMEngine`` calls for ``OffloadConfig``: uniform counts
(ties broken by expert id) unless a usage file is given, a local Ray instance
advertising ``expert_hosts`` units of the resource when Ray is not initialised yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from torch import nn

from tierserve.actors.expert_host import EXPERT_HOST_RESOURCE, ExpertHost
from tierserve.errors import InvalidParameterError, TierserveError
from tierserve.models.moe import SparseMoeBlock
from tierserve.moe.dispatch import OffloadedMoeBlock
from tierserve.moe.expert_weights import CheckpointExperts, ExpertWeights
from tierserve.moe.host_pool import HostPool
from tierserve.moe.placement import Placement, plan_placement, shard_cold
from tierserve.moe.socket_channel import SocketChannel
from tierserve.moe.spare_slots import CostModel, SpareSlots


@dataclass
class OffloadHandle:
    placement: Placement
    shards: dict[str, list[tuple[int, int]]]
    pool: HostPool
    blocks: list[OffloadedMoeBlock]
    spare: SpareSlots | None
    owns_hosts: bool = False  # started by offload_from_config: close() kills them

    @property
    def stats(self):
        return self.pool.stats

    def close(self) -> None:
        self.pool.close()
        if self.spare is not None:
            self.spare.close()
        if self.owns_hosts:
            for h in self.pool.hosts.values():
                ray.kill(h)


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, SparseMoeBlock]]:
    """(decoder layer, its SparseMoeBlock) for every MoE layer, in model order."""
    return [(layer, layer.mlp) for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]


def start_expert_hosts(n: int, linear_backend: str = "auto", num_threads: int | None = None,
                       timeout_s: float = 60.0) -> dict[str, "ray.actor.ActorHandle"]:
    if n < 1:
        raise InvalidParameterError("expert_hosts", f"must be >= 1, got {n}")
    hosts = {f"host{i}": ExpertHost.remote(linear_backend, num_threads) for i in range(n)}
    ready, _ = ray.wait([h.ping.remote() for h in hosts.values()], num_returns=n, timeout=timeout_s)
    if len(ready) < n:
        for h in hosts.values():
            ray.kill(h)
        raise TierserveError(f"only {len(ready)} of {n} expert hosts started within {timeout_s}s: each needs a "
                             f"node advertising the {EXPERT_HOST_RESOURCE!r} resource")
    return hosts


#: Fused-dispatch channels (module doc, step 4).
CHANNELS = ("socket", "ray")


def connect_channels(hosts: dict, channel: str, timeout_s: float) -> dict[str, SocketChannel]:
    """One connected channel per host for ``channel="socket"``; none (plain actor calls) for ``"ray"``."""
    if channel not in CHANNELS:
        raise InvalidParameterError("channel", f"must be one of {list(CHANNELS)}, got {channel!r}")
    if channel == "ray":
        return {}
    addresses = ray.get([h.open_channel.remote() for h in hosts.values()], timeout=timeout_s)
    return {name: SocketChannel((ip, port), timeout_s, bytes.fromhex(token))
            for name, (ip, port, token) in zip(hosts, addresses)}


def apply_expert_offload(model: nn.Module, placement: Placement, hosts, *, model_path: str | None = None,
                         linear_backend: str = "auto", counts=None, timeout_s: float = 30.0,
                         spare_slots: int = 0, cost: CostModel | None = None,
                         channel: str = "socket") -> OffloadHandle:
    """Swap every MoE block for an OffloadedMoeBlock (module doc); ``hosts``: name -> ExpertHost handle."""
    hosts = dict(hosts) if isinstance(hosts, dict) else {f"host{i}": h for i, h in enumerate(hosts)}
    blocks = moe_blocks(model)
    if len(placement.num_experts) != len(blocks) or any(
            b.num_experts != n for (_, b), n in zip(blocks, placement.num_experts)):
        raise InvalidParameterError(
            "placement", f"covers {list(placement.num_experts)} experts per layer, the model has "
                         f"{[b.num_experts for _, b in blocks]}")
    act = {j: model.cfg.hidden_act for j in range(len(blocks))}
    cold = {(j, e): blocks[j][1].experts[e] for j, e in placement.cold_keys()}
    weights = {key: ExpertWeights.from_module(m, act[key[0]]) for key, m in cold.items()}
    source = CheckpointExperts.from_model(model_path, model, cold, act) if model_path and cold else None
    sizes = [[_expert_bytes(b) for _ in range(b.num_experts)] for _, b in blocks]
    shards = shard_cold(placement, list(hosts), counts, sizes)
    ray.get([hosts[h].load_experts.remote({k: weights[k] for k in keys})
             for h, keys in shards.items() if keys])
    owners = {key: h for h, keys in shards.items() for key in keys}
    pool = HostPool(hosts, owners, source, linear_backend, timeout_s, connect_channels(hosts, channel, timeout_s))
    spare = SpareSlots(spare_slots, linear_backend) if spare_slots else None
    new_blocks = []
    for j, (layer, block) in enumerate(blocks):
        new = OffloadedMoeBlock(block, j, placement.resident[j], pool, sizes[j][0], spare, cost)
        layer.mlp = new
        new_blocks.append(new)
    return OffloadHandle(placement, shards, pool, new_blocks, spare)


def _expert_bytes(block: SparseMoeBlock) -> int:
    e = block.experts[0]
    return sum(p.numel() * p.element_size() for p in e.parameters())


def offload_from_config(model: nn.Module, cfg, model_path: str | None, linear_backend: str) -> OffloadHandle:
    """Apply ``OffloadConfig`` ``cfg`` to a freshly loaded model (module doc)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise InvalidParameterError("resident_experts", "the model has no MoE layers to offload")
    counts = [[0] * b.num_experts for _, b in blocks]
    if cfg.usage_path:
        from tierserve.moe.usage import ExpertUsage

        counts = [list(row) for row in ExpertUsage.load(cfg.usage_path).counts]
    placement = plan_placement(counts, cfg.resident_experts, cfg.per_layer_floor)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, resources={EXPERT_HOST_RESOURCE: cfg.expert_hosts})
    hosts = start_expert_hosts(cfg.expert_hosts, linear_backend)
    if model_path is not None and not os.path.isdir(model_path):
        model_path = None  # a .gguf file: a dead host's experts cannot be re-read (ExpertHostError then)
    handle = apply_expert_offload(model, placement, hosts, model_path=model_path, linear_backend=linear_backend,
                                  counts=counts, timeout_s=cfg.timeout_s, spare_slots=cfg.spare_slots,
                                  channel=cfg.channel)
    handle.owns_hosts = True
    return handle
