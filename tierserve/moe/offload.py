"""apply_expert_offload: the transform that moves a built MoE model's cold experts to expert hosts.

``apply_expert_offload(model, placement, hosts)``:

1. finds the model's ``SparseMoeBlock`` layers; placement layer ``j`` is the j-th MoE
   block in model order (dense layers of e.g. Qwen2-MoE ``mlp_only_layers`` are skipped);
2. shards the cold experts over the hosts (``placement.shard_cold``, balanced by bytes
   then per-layer traffic when ``counts`` are given) and, the same way, a standby copy
   of every resident expert (hosts hold ALL experts, so a runtime promotion moves no
   weights to a host: tierserve.moe.promotion); ships each host its experts' weights
   (numpy, ``load_experts`` calls of <= ``SHIP_CHUNK_BYTES``, one per host in flight);
3. records where each expert sits in the checkpoint (``CheckpointExperts``, when
   ``model_path`` is a safetensors folder) so a dead host's experts can be re-read;
4. connects the fused-dispatch channel to every host: ``channel="socket"`` (default)
   opens a direct TCP socket per host (``ExpertHost.open_channel``; ~0.3 ms instead of
   ~1.3 ms per round trip, measured in benchmarks/offload.py), ``"ray"`` keeps plain
   actor calls; the Ray path is always kept for loading, copies and failover;
5. replaces every block by an :class:`OffloadedMoeBlock` holding only its resident
   experts: the cold experts' tensors are dropped from the worker;
6. attaches a usage recorder to the new blocks (the handle's ``live`` counts, see
   tierserve.moe.offload_handle for promotions, saving and metrics).

It must run BEFORE the linear-backend transform (it reads plain ``nn.Linear``
weights); hosts apply the same ``linear_backend`` name, so the engine's later
``apply_linear_backend(model, name)`` packs the resident experts with identical kernels.

``start_expert_hosts(n)`` starts ``n`` :class:`ExpertHost` actors (one per node carrying
the ``expert_host`` resource) and waits until all answer ``ping`` within ``timeout_s``.
``offload_from_config`` is what ``LLMEngine`` calls for ``OffloadConfig``. Usage file:
``OffloadConfig.usage_path`` when set (a missing file means "start from zero counts and
save here"), else ``expert_usage.json`` beside the model folder when it exists (saved
back there); with neither, counts are uniform (ties broken by expert id) and nothing is
saved. A local Ray instance advertising ``expert_hosts`` units of the resource is started
when Ray is not initialised yet. With ``OffloadConfig.spare_slots`` it measures the spare
ring's ``CostModel`` against a live host once the channels are up
(``CostModel.measure``: a fetch, 1- and 64-row round trips, local runs) and installs it
on every block; ``apply_expert_offload`` alone uses the ``cost`` it is given (defaults
otherwise).
"""

from __future__ import annotations

import os

import ray
import torch
from torch import nn

from tierserve.actors.expert_host import EXPERT_HOST_RESOURCE, ExpertHost
from tierserve.errors import InvalidParameterError, TierserveError
from tierserve.models.moe import SparseMoeBlock
from tierserve.moe.dispatch import OffloadedMoeBlock
from tierserve.moe.expert_weights import CheckpointExperts, ExpertWeights
from tierserve.moe.host_pool import HostPool
from tierserve.moe.host_storage import HOST_WEIGHT_FORMATS
from tierserve.moe.offload_handle import OffloadHandle
from tierserve.moe.placement import Placement, plan_placement, shard_cold
from tierserve.moe.socket_channel import SocketChannel
from tierserve.moe.spare_slots import CostModel, SpareSlots
from tierserve.moe.usage import ExpertUsage, usage_path
from tierserve.moe.usage_hook import attach_usage_recorder

__all__ = ["OffloadHandle", "apply_expert_offload", "offload_from_config", "start_expert_hosts", "moe_blocks"]


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, SparseMoeBlock]]:
    """(decoder layer, its SparseMoeBlock) for every MoE layer, in model order."""
    return [(layer, layer.mlp) for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]


def start_expert_hosts(n: int, linear_backend: str = "auto", num_threads: int | None = None,
                       timeout_s: float = 60.0, weight_format: str = "raw") -> dict[str, "ray.actor.ActorHandle"]:
    if n < 1:
        raise InvalidParameterError("expert_hosts", f"must be >= 1, got {n}")
    if weight_format not in HOST_WEIGHT_FORMATS:
        raise InvalidParameterError("host_weight_format", f"must be one of {sorted(HOST_WEIGHT_FORMATS)}, "
                                                          f"got {weight_format!r}")
    hosts = {f"host{i}": ExpertHost.remote(linear_backend, num_threads, weight_format) for i in range(n)}
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
    every = {(j, e): b.experts[e] for j, (_, b) in enumerate(blocks) for e in range(b.num_experts)}
    weights = {key: ExpertWeights.from_module(m, act[key[0]]) for key, m in every.items()}
    source = CheckpointExperts.from_model(model_path, model, every, act) if model_path else None
    sizes = [[_expert_bytes(b) for _ in range(b.num_experts)] for _, b in blocks]
    shards = shard_cold(placement, list(hosts), counts, sizes)
    # the resident experts' standby copies: "cold" under the complementary placement
    inverse = Placement(tuple(placement.cold(j) for j in range(len(blocks))), placement.num_experts)
    standby_shards = shard_cold(inverse, list(hosts), counts, sizes)
    _ship(hosts, {h: shards[h] + standby_shards[h] for h in hosts}, weights)
    del weights
    owners = {key: h for h, keys in shards.items() for key in keys}
    standby = {key: h for h, keys in standby_shards.items() for key in keys}
    pool = HostPool(hosts, owners, source, linear_backend, timeout_s, connect_channels(hosts, channel, timeout_s),
                    standby)
    spare = SpareSlots(spare_slots, linear_backend) if spare_slots else None
    new_blocks = []
    for j, (layer, block) in enumerate(blocks):
        new = OffloadedMoeBlock(block, j, placement.resident[j], pool, sizes[j][0], spare, cost)
        layer.mlp = new
        new_blocks.append(new)
    base = [list(row) for row in counts] if counts is not None else [[0] * n for n in placement.num_experts]
    live = ExpertUsage(len(blocks), max(placement.num_experts))
    handle = OffloadHandle(placement, shards, pool, new_blocks, spare, base, live)
    handle.recorder = attach_usage_recorder(model, live)
    return handle


#: At most this many weight bytes per ``load_experts`` call (bounds the object store in use).
SHIP_CHUNK_BYTES = 32 * 2**20


def _ship(hosts: dict, keys: dict[str, list], weights: dict) -> None:
    """Load each host's experts in waves: one call of <= SHIP_CHUNK_BYTES per host in flight at a time."""
    chunks = {}
    for h, ks in keys.items():
        chunks[h], cur, size = [], [], 0
        for k in ks:
            if cur and size + weights[k].nbytes > SHIP_CHUNK_BYTES:
                chunks[h].append(cur)
                cur, size = [], 0
            cur.append(k)
            size += weights[k].nbytes
        if cur:
            chunks[h].append(cur)
    for wave in range(max((len(c) for c in chunks.values()), default=0)):
        ray.get([hosts[h].load_experts.remote({k: weights[k] for k in c[wave]})
                 for h, c in chunks.items() if wave < len(c)])


def _expert_bytes(block: SparseMoeBlock) -> int:
    e = block.experts[0]
    return sum(p.numel() * p.element_size() for p in e.parameters())


def offload_from_config(model: nn.Module, cfg, model_path: str | None, linear_backend: str) -> OffloadHandle:
    """Apply ``OffloadConfig`` ``cfg`` to a freshly loaded model (module doc)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise InvalidParameterError("resident_experts", "the model has no MoE layers to offload")
    if model_path is not None and not os.path.isdir(model_path):
        model_path = None  # a .gguf file: a dead host's experts cannot be re-read (ExpertHostError then)
    file = cfg.usage_path or (usage_path(model_path) if model_path is not None else None)
    counts = load_counts(file, [b.num_experts for _, b in blocks])
    if cfg.usage_path is None and not (file and os.path.isfile(file)):
        file = None  # no usage file beside the model: do not create one
    placement = plan_placement(counts, cfg.resident_experts, cfg.per_layer_floor)
    dtype = blocks[0][1].experts[0].gate_up_proj.weight.dtype
    if cfg.host_weight_format == "dfloat11" and dtype != torch.bfloat16:
        raise InvalidParameterError("host_weight_format", f"'dfloat11' is lossless for bfloat16 weights only; the "
                                                          f"model's experts are {dtype} (set dtype='bfloat16')")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, resources={EXPERT_HOST_RESOURCE: cfg.expert_hosts})
    hosts = start_expert_hosts(cfg.expert_hosts, linear_backend, weight_format=cfg.host_weight_format)
    handle = apply_expert_offload(model, placement, hosts, model_path=model_path, linear_backend=linear_backend,
                                  counts=counts, timeout_s=cfg.timeout_s, spare_slots=cfg.spare_slots,
                                  channel=cfg.channel)
    handle.owns_hosts = True
    if handle.spare is not None and handle.pool.owners:
        cost = CostModel.measure(handle.pool, min(handle.pool.owners))
        for block in handle.blocks:
            block.cost = cost
    handle.usage_file = file
    handle.min_gain, handle.max_swaps = cfg.promotion_min_gain, cfg.promotion_max_swaps
    handle.save_interval_s = cfg.usage_save_interval_s
    return handle


def load_counts(path: str | None, num_experts: list[int]) -> list[list[int]]:
    """Counts from the usage file at ``path`` (zeros when None or missing), checked against the model."""
    if path is None or not os.path.isfile(path):
        return [[0] * n for n in num_experts]
    usage = ExpertUsage.load(path)
    if usage.num_layers != len(num_experts) or any(n != usage.num_experts for n in num_experts):
        raise InvalidParameterError(
            "usage_path", f"{path} holds {usage.num_layers} layers x {usage.num_experts} experts, the model has "
                          f"{len(num_experts)} MoE layers with {num_experts} experts")
    return [list(row) for row in usage.counts]
