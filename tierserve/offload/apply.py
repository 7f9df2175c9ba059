"""apply_expert_offload: the transform that moves a built MoE model's cold experts to expert hosts.

``apply_expert_offload(model, placement, hosts)`` (``hosts``: name -> ``ExpertTransport``
of an already started host, tierserve.offload.transport; launchers start them):

1. finds the model's ``SparseMoeBlock`` layers; placement layer ``j`` is the j-th MoE
   block in model order (dense layers of e.g. Qwen2-MoE ``mlp_only_layers`` are skipped);
2. shards the cold experts over the hosts (``placement.shard_cold``, balanced by bytes
   then per-layer traffic when ``counts`` are given) and, the same way, a standby copy
   of every resident expert (hosts hold ALL experts, so a runtime promotion moves no
   weights to a host: tierserve.offload.promotion); ships each host its experts' weights
   through its transport (``load_experts`` calls of <= ``SHIP_CHUNK_BYTES``, one per
   host in flight, the hosts loaded in parallel);
3. records where each expert sits in the checkpoint (``CheckpointExperts``, when
   ``model_path`` is a safetensors folder) so a dead host's experts can be re-read;
4. replaces every block by an :class:`OffloadedMoeBlock` holding only its resident
   experts: the cold experts' tensors are dropped from the worker;
5. attaches a usage recorder to the new blocks (the hook's ``live`` counts, see
   tierserve.offload.hook for promotions, saving and metrics).

It must run BEFORE the linear-backend transform (it reads plain ``nn.Linear``
weights); hosts apply the same ``linear_backend`` name, so the engine's later
``apply_linear_backend(model, name)`` packs the resident experts with identical kernels.
Which path fused messages take (a direct socket, or Ray actor calls) is the
transports' business (``HostSpec.channel``, tierserve.offload.launcher).
``load_counts`` reads a usage file for placement (tierserve.offload.build).
"""


from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from torch import nn

from tierserve.errors import InvalidParameterError
from tierserve.models.moe import SparseMoeBlock
from tierserve.offload.dispatch import OffloadedMoeBlock
from tierserve.offload.expert_weights import CheckpointExperts, ExpertWeights
from tierserve.offload.hook import OffloadHook
from tierserve.offload.host_pool import HostPool
from tierserve.offload.placement import Placement, shard_cold
from tierserve.offload.spare_slots import CostModel, SpareSlots
from tierserve.offload.transport import ExpertTransport
from tierserve.offload.usage import ExpertUsage
from tierserve.offload.usage_hook import attach_usage_recorder

__all__ = ["apply_expert_offload", "load_counts", "moe_blocks"]


def moe_blocks(model: nn.Module) -> list[tuple[nn.Module, SparseMoeBlock]]:
    """(decoder layer, its SparseMoeBlock) for every MoE layer, in model order."""
    return [(layer, layer.mlp) for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]


def apply_expert_offload(model: nn.Module, placement: Placement, hosts: dict[str, ExpertTransport], *,
                         model_path: str | None = None, linear_backend: str = "auto", counts=None,
                         timeout_s: float = 30.0, spare_slots: int = 0,
                         cost: CostModel | None = None, device: str = "cpu") -> OffloadHook:
    """Swap every MoE block for an OffloadedMoeBlock (module doc); ``hosts``: name -> started host's transport;
    ``device``: where the worker runs (the model is moved there after this transform: a CUDA worker's cold
    experts never reach the GPU; experts the worker builds later go there directly)."""
    hosts = dict(hosts)
    if not hosts:
        raise InvalidParameterError("expert_hosts", "must be >= 1, got 0")
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
    ship(hosts, {h: shards[h] + standby_shards[h] for h in hosts}, weights, timeout_s)
    del weights
    owners = {key: h for h, keys in shards.items() for key in keys}
    standby = {key: h for h, keys in standby_shards.items() for key in keys}
    pool = HostPool(hosts, owners, source, linear_backend, timeout_s, standby, device)
    spare = SpareSlots(spare_slots, linear_backend, device) if spare_slots else None
    new_blocks = []
    for j, (layer, block) in enumerate(blocks):
        new = OffloadedMoeBlock(block, j, placement.resident[j], pool, sizes[j][0], spare, cost)
        layer.mlp = new
        new_blocks.append(new)
    base = [list(row) for row in counts] if counts is not None else [[0] * n for n in placement.num_experts]
    live = ExpertUsage(len(blocks), max(placement.num_experts))
    hook = OffloadHook(placement, shards, pool, new_blocks, spare, base, live)
    hook.recorder = attach_usage_recorder(model, live)
    return hook


#: At most this many weight bytes per ``load_experts`` call (bounds the memory a message takes).
SHIP_CHUNK_BYTES = 32 * 2**20


def chunk_keys(keys: list, nbytes: dict) -> list[list]:
    """``keys`` in order, cut into runs of <= SHIP_CHUNK_BYTES (a single larger expert forms its own run)."""
    chunks, cur, size = [], [], 0
    for k in keys:
        if cur and size + nbytes[k] > SHIP_CHUNK_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes[k]
    if cur:
        chunks.append(cur)
    return chunks


def ship(hosts: dict[str, ExpertTransport], keys: dict[str, list], weights: dict, timeout_s: float) -> None:
    """Load each host's experts: its chunks one after another, the hosts in parallel (one thread each)."""
    nbytes = {k: w.nbytes for k, w in weights.items()}

    def one(h: str) -> None:
        for chunk in chunk_keys(keys[h], nbytes):
            hosts[h].load_experts({k: weights[k] for k in chunk}, timeout_s)

    with ThreadPoolExecutor(max_workers=max(1, len(keys)), thread_name_prefix="expert-ship") as ex:
        for f in [ex.submit(one, h) for h in keys]:
            f.result()


def _expert_bytes(block: SparseMoeBlock) -> int:
    e = block.experts[0]
    return sum(p.numel() * p.element_size() for p in e.parameters())


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
