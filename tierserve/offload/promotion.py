"""Runtime promotions: make a hot cold expert resident on the worker, evict a cold resident one.

Called only at request boundaries (``OffloadHook.at_request_boundary``, which the
engine calls between steps after a step in which requests finished): no forward is in
flight, so swapping modules cannot mix two placements inside one step.

**Which swaps.** ``plan_promotions`` (tierserve.offload.placement) over the live counts
(the usage loaded at start plus the traffic recorded since): per layer the i-th hottest
cold expert is paired with the i-th coldest resident one; a pair swaps when its count
gain is at least ``min_gain``; at most ``max_swaps`` swaps per boundary, best gains first.
A candidate whose weights cannot be reached (its evicted expert has no live standby
host, or the promoted one has no live holder) is skipped and the next one is tried.

**Where the weights come from and go.** Hosts hold every expert (tierserve.offload.host_pool:
``owners`` for cold ones, ``standby`` for resident ones), so a swap moves no weights to
a host: the promoted expert is copied from its owner (``fetch_expert`` of
tierserve.offload.expert_transit: one ``get_expert_payload`` call on its transport with ``timeout_s``;
raw arrays cross the wire from a ``"raw"`` host, the DFloat11-coded expert from a
``"dfloat11"`` host, decoded here bit-identically; the bytes moved are added to
``pool.stats.promotion_bytes``) and built with the worker's linear backend, the same
kernels the host and the resident experts run, so output stays bit-identical; the evicted expert's
module is dropped from the worker and its standby host becomes its owner. The promoted
expert's host keeps its copy as the standby. An expert that runs on the worker after
every host died (``HostPool.local``) is promoted by moving its module. A host that
fails the copy is failed over (``HostPool.fail``) and the swap is skipped.
"""

from __future__ import annotations

import torch

from tierserve.offload.expert_transit import fetch_expert
from tierserve.offload.expert_weights import build_expert
from tierserve.offload.host_pool import HostPool
from tierserve.offload.placement import Placement, Swap, apply_swaps, plan_promotions
from tierserve.offload.transport import HostCallError


def _fetch(pool: HostPool, key) -> torch.nn.Module | None:
    """The worker module for cold ``key`` (copied from its owner), or None when unreachable."""
    if key in pool.local:
        return pool.local[key]
    owner = pool.owner(key)
    if owner is None:
        return None
    try:
        fetched = fetch_expert(pool.transport(owner), key, pool.timeout_s)
    except HostCallError as exc:
        pool.fail(owner, f"promotion copy: {type(exc).__name__}")
        return None
    pool.stats.promotion_bytes.merge(fetched.bytes)
    return build_expert(fetched.weights, pool.linear_backend, pool.device)


def apply_swap(blocks, pool: HostPool, swap: Swap) -> bool:
    """Apply one swap to the offloaded blocks and the pool's maps; False (nothing changed) if unreachable."""
    block = blocks[swap.layer]
    promote, evict = (swap.layer, swap.promote), (swap.layer, swap.evict)
    keeper = pool.standby.get(evict)
    if keeper is None or keeper not in pool.alive:
        return False
    module = _fetch(pool, promote)
    if module is None:
        return False
    holder = pool.owners.pop(promote, None)
    pool.local.pop(promote, None)
    if holder is not None:
        pool.standby[promote] = holder
    del pool.standby[evict]
    pool.owners[evict] = keeper
    block.experts[str(swap.promote)] = module
    del block.experts[str(swap.evict)]
    return True


def promote(blocks, pool: HostPool, placement: Placement, counts, min_gain: int,
            max_swaps: int) -> tuple[Placement, list[Swap]]:
    """Plan and apply up to ``max_swaps`` swaps (module doc); the new placement and the swaps applied."""
    if max_swaps == 0:
        return placement, []
    applied: list[Swap] = []
    # every candidate pair, best first; unreachable ones are skipped (so ask for all of them)
    for swap in plan_promotions(placement, counts, min_gain, sum(placement.num_experts)):
        if len(applied) == max_swaps:
            break
        if apply_swap(blocks, pool, swap):
            applied.append(swap)
    return apply_swaps(placement, applied), applied
