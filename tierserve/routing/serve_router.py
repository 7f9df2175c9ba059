"""Ray Serve adapter: ``PrefixAwareRequestRouter`` runs ``PrefixAwarePolicy`` inside Serve.

Plugging it in (Ray 2.60, ``ray.serve.request_router.RequestRouter``)::

    @serve.deployment(request_router_config=RequestRouterConfig(
        request_router_class="tierserve.routing.serve_router:PrefixAwareRequestRouter",
        request_router_kwargs={"abs_threshold": 4, "rel_threshold": 1.5}))
    class Worker: ...

Request contract. The ingress tokenizes the prompt, computes its chained
block hashes with the worker's block size (``routing_kwargs(token_ids,
block_size)``) and calls the worker through its handle with the keyword
argument ``prefix_block_hashes: list[bytes]`` (``PREFIX_HASHES_KWARG``). The
router reads it from ``PendingRequest.kwargs``; the worker method must accept
it (it may ignore it). A request without it is routed by load alone.

Replica contract. A worker replica reports what its device KV cache holds to
the deployment's tree actor (``tierserve.routing.tree_actor``) as diffs,
``report(replica_id, added_chains, evicted)``, with ``replica_id`` its
``serve.get_replica_context().replica_id.unique_id``, the same id the router
sees as ``RunningReplica.replica_id.unique_id``.

One routing step (``choose_replicas``):

1. hashes = the request's ``prefix_block_hashes`` (empty if absent; a
   malformed value, not a list of 32-byte digests, is logged with the field
   and the request is routed by load alone, never dropped);
2. matches = ``await tree.match(hashes, candidate ids, lower=False)``: the
   device match and each candidate's cached block count (the policies'
   tie-break between equally loaded replicas, routing/policy.py), bounded by
   ``match_timeout_s`` (default 0.1 s; the actor round trip is ~1 ms). On
   timeout or a dead actor the step routes by load alone (a warning is
   logged); the event loop is never blocked. A dead tree actor (killed, its
   node lost) is looked up again by name (``get_or_create_tree_actor``
   recreates it; replicas re-send their whole cache to it, server/worker.py),
   so routing by prefix resumes without a redeploy;
3. load of each candidate = the larger of Ray Serve's replica queue-length
   cache (``replica_queue_len_cache``; an unknown entry counts as 0) and the
   router's own count of requests it sent there that have not completed
   (``on_send_request`` +1, ``decrement_queue_len_cache`` -1, floor 0). Serve's
   cache alone can lose a request in flight: a queue-length probe answered
   just before the request reached the replica lands after the send and
   overwrites the entry with the older count (seen with Ray 2.60: a replica
   holding a request read 0, so routing by load sent the next request to it);
   the router's own count cannot be overwritten that way;
4. prefixes in flight (routing/inflight.py): each candidate's device match is
   the larger of the tree's and the leading blocks of the request that this
   router sent to it in the last ``inflight_ttl_s`` seconds (default 10; 0:
   off), which its replica will hold before its next report reaches the tree;
   so requests that share a prompt routed moments apart go to one replica
   instead of each prefilling the prompt on another;
5. ``PrefixAwarePolicy.rank`` orders every candidate (``num_request_blocks =
   len(hashes)``, so a best match shorter than ``min_match_ratio`` of the
   request routes by load); the router returns one
   rank per replica, so Serve tries the chosen replica first and falls back
   in policy order if it rejects the request (queue full). The request's
   hashes are recorded as in flight on the first-ranked replica (a fallback
   after a rejection is not seen; the entry then expires unused).

Lower KV tiers (``kv_tiers``, e.g. ``["dram", "redis"]``, the app's
``--kv-tiers``; empty = off): step 2 asks ``await tree.match(hashes,
candidate ids)`` (``lower=True``), which also returns, per candidate, the blocks each
lower tier would serve after its device match (routing/tier_index.py), and
step 5 passes them as ``lower_tier_matches`` to a policy built with
``tier_weights=KV_TIER_WEIGHTS`` (device 1.0, dram 0.8, disk 0.5, redis 0.3;
routing/policy.py). Replicas report their tier chunks with their device diff
(server/cache_reporter.py ``TierMirror``).

Router v2 (``policy="cost_aware"``, the app's ``router: cost``): step 5 uses
``CostAwarePolicy`` (routing/policy.py) built with the deployment's
``block_size``, ``token_budget``, ``max_num_seqs`` and ``decode_tokens``;
each candidate's ``ReplicaLoad`` then also carries what the replica last
reported through Serve's routing stats (``RunningReplica.routing_stats``,
filled by the worker's ``record_routing_stats``, polled every
``request_routing_stats_period_s``; keys ``ROUTING_STATS_KEYS``): its queued
prompt tokens not prefilled yet, its ``max_num_seqs`` and token budget. A
replica that has not reported yet counts 0 queued tokens and the policy's
capacity. Requests in flight come from Serve's queue-length cache as above
(fresher than any report).

Queue-length probes. Before sending, Serve asks the chosen replica for its
queue length and skips it if no answer comes within the router's deadline.
Serve's default, 0.1 s, throws the prefix away whenever the owner's event
loop is slow for a moment (a CPU engine step holding the interpreter, a busy
host): the request then pays its whole prefill elsewhere. This router starts
at ``QUEUE_LEN_DEADLINE_S`` = 0.5 s, which Serve doubles on repeated misses up
to ``MAX_QUEUE_LEN_DEADLINE_S`` = 2 s; the environment variables
``RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S`` and
``RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S`` still override both.

When Serve reports a replica dead, the router asks the tree actor to forget
it (fire and forget).

Tests: tests/test_serve_router.py runs a real Serve app with two replicas
and checks that requests go to the replica holding their prefix. tests/test_tier_routing_serve.py does the same
with ``kv_tiers``: a replica's DRAM chunks outweigh fewer device blocks of
another replica and lose to more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

import ray
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tierserve.cache.prefix_hash import HASH_BYTES, hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing.inflight import DEFAULT_TTL_S, InflightPrefixes, merge_matches
from tierserve.routing.policy import KV_TIER_WEIGHTS, ReplicaLoad, make_policy
from tierserve.routing.tier_index import LOWER_TIERS
from tierserve.routing.tree_actor import PrefixMatch, get_or_create_tree_actor

logger = logging.getLogger(__name__)

#: Keyword argument carrying the request's chained block hashes.
PREFIX_HASHES_KWARG = "prefix_block_hashes"
#: Keys of a replica's routing stats (``record_routing_stats``), as ``ReplicaLoad`` fields.
ROUTING_STATS_KEYS = ("pending_prefill_tokens", "max_num_seqs", "token_budget")
#: Router policies this adapter runs (``request_router_kwargs: {policy: ...}``).
ROUTER_POLICIES = ("prefix_aware", "cost_aware")  # the registry names of routing/policy.py POLICIES
#: First and largest deadline of Serve's queue-length probe (module doc, Queue-length probes).
QUEUE_LEN_DEADLINE_S = float(os.environ.get("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", 0.5))
MAX_QUEUE_LEN_DEADLINE_S = float(os.environ.get("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", 2.0))


def routing_stats(pending_prefill_tokens: int, max_num_seqs: int, token_budget: int) -> dict[str, int]:
    """A replica's routing stats: what ``CostAwarePolicy`` needs of it (module doc, Router v2)."""
    return dict(zip(ROUTING_STATS_KEYS, (int(pending_prefill_tokens), int(max_num_seqs), int(token_budget))))


def replica_load(replica_id: str, ongoing_requests: int, stats: dict | None, cached_blocks: int = 0) -> ReplicaLoad:
    """The policy's view of one replica: Serve's in-flight count, the blocks the prefix tree says it caches,
    plus its last routing stats (if valid)."""
    stats = stats or {}
    values = {k: stats.get(k) for k in ROUTING_STATS_KEYS}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        return ReplicaLoad(replica_id, ongoing_requests, cached_blocks=cached_blocks)
    try:
        return ReplicaLoad(replica_id, ongoing_requests, cached_blocks=cached_blocks, **values)
    except InvalidParameterError as exc:
        logger.warning("ignoring routing stats of %s: %s", replica_id, exc)
        return ReplicaLoad(replica_id, ongoing_requests, cached_blocks=cached_blocks)


def routing_kwargs(token_ids: Sequence[int], block_size: int, extra: tuple = ()) -> dict[str, list[bytes]]:
    """Keyword arguments an ingress adds to a worker call so the router sees the prefix."""
    return {PREFIX_HASHES_KWARG: hash_blocks(token_ids, block_size, extra=extra)}


def request_block_hashes(pending_request: PendingRequest | None) -> list[bytes]:
    """The request's block hashes from its kwargs; [] when absent; raises on a malformed value."""
    if pending_request is None:
        return []
    value = pending_request.kwargs.get(PREFIX_HASHES_KWARG)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidParameterError(PREFIX_HASHES_KWARG, f"must be a list of bytes, got {type(value).__name__}")
    for i, h in enumerate(value):
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise InvalidParameterError(PREFIX_HASHES_KWARG, f"item {i} must be {HASH_BYTES} bytes, got {h!r:.40}")
    return list(value)


class PrefixAwareRequestRouter(RequestRouter):
    """Serve request router: longest cached prefix bounded by load (see module doc)."""

    queue_len_response_deadline_s = QUEUE_LEN_DEADLINE_S
    max_queue_len_response_deadline_s = max(MAX_QUEUE_LEN_DEADLINE_S, QUEUE_LEN_DEADLINE_S)

    def initialize_state(self, abs_threshold: float = 4, rel_threshold: float = 1.5,
                         match_timeout_s: float = 0.1, max_blocks_per_replica: int | None = None,
                         tree_actor=None, min_match_ratio: float = 0.1, kv_tiers: Sequence[str] = (),
                         policy: str = "prefix_aware", block_size: int = 16, token_budget: int = 2048,
                         max_num_seqs: int = 64, decode_tokens: float = 256.0,
                         inflight_ttl_s: float = DEFAULT_TTL_S) -> None:
        """Called by Serve with ``request_router_kwargs``; ``tree_actor`` overrides the named actor."""
        if not match_timeout_s > 0:
            raise InvalidParameterError("match_timeout_s", f"must be > 0, got {match_timeout_s}")
        unknown = [t for t in kv_tiers if t not in LOWER_TIERS]
        if unknown:
            raise InvalidParameterError("kv_tiers", f"unknown tier {unknown[0]!r}; choose from {LOWER_TIERS}")
        self._kv_tiers = tuple(kv_tiers)
        weights = KV_TIER_WEIGHTS if self._kv_tiers else None
        policy_kwargs = {
            "prefix_aware": {"abs_threshold": abs_threshold, "rel_threshold": rel_threshold,
                             "min_match_ratio": min_match_ratio},
            "cost_aware": {"block_size": block_size, "token_budget": token_budget,
                           "max_num_seqs": max_num_seqs, "decode_tokens": decode_tokens,
                           "min_match_ratio": min_match_ratio},
        }
        if policy not in policy_kwargs:
            raise InvalidParameterError("policy", f"must be one of {ROUTER_POLICIES}, got {policy!r}")
        self._policy = make_policy(policy, tier_weights=weights, **policy_kwargs[policy])
        self._match_timeout_s = match_timeout_s
        self._inflight = InflightPrefixes(inflight_ttl_s)
        self._sent: dict[str, int] = {}  # replica id -> requests this router sent that have not completed
        self._max_blocks_per_replica = max_blocks_per_replica
        self._named_tree = tree_actor is None  # the deployment's named actor: looked up again if it dies
        if tree_actor is None:
            tree_actor = get_or_create_tree_actor(
                self._deployment_id.app_name, self._deployment_id.name, max_blocks_per_replica)
        self._tree_actor = tree_actor

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        try:
            hashes = request_block_hashes(pending_request)
        except InvalidParameterError as exc:
            logger.warning("routing by load only: %s", exc)
            hashes = []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        found = await self._lookup(hashes, list(by_id)) if hashes else PrefixMatch()
        now = time.monotonic()
        device, lower = merge_matches(found.device, found.lower, self._inflight.match(hashes, by_id, now))  # step 4
        loads = [replica_load(rid, self._ongoing(r), getattr(r, "routing_stats", None), found.cached.get(rid, 0))
                 for rid, r in by_id.items()]
        ranked = self._policy.rank(device, loads, lower or None, num_request_blocks=len(hashes))
        if hashes and ranked:
            self._inflight.record(ranked[0].replica_id, hashes, now)
        return [[by_id[d.replica_id]] for d in ranked]

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._sent.pop(replica_id.unique_id, None)
        self._inflight.forget(replica_id.unique_id)
        self._tree_actor.drop_replica.remote(replica_id.unique_id)

    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        self._sent[replica_id.unique_id] = self._sent.get(replica_id.unique_id, 0) + 1

    def decrement_queue_len_cache(self, replica_id) -> None:
        super().decrement_queue_len_cache(replica_id)
        left = self._sent.get(replica_id.unique_id, 0) - 1
        if left > 0:
            self._sent[replica_id.unique_id] = left
        else:
            self._sent.pop(replica_id.unique_id, None)

    def _ongoing(self, replica: RunningReplica) -> int:
        """Step 3 of the module doc: Serve's cached queue length, never below what this router has in flight."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id) or 0
        return max(queue_len, self._sent.get(replica.replica_id.unique_id, 0))

    async def _lookup(self, hashes: list[bytes], replica_ids: list[str]) -> PrefixMatch:
        try:
            ref = self._tree_actor.match.remote(hashes, replica_ids, lower=bool(self._kv_tiers))
            found = await asyncio.wait_for(ref, timeout=self._match_timeout_s)
            # only the tiers this app runs have weights; others cannot be reported by its replicas
            return PrefixMatch(found.device, {t: m for t, m in found.lower.items() if t in self._kv_tiers},
                               found.cached)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as exc:
            logger.warning("prefix tree lookup failed (%s); routing by load only", type(exc).__name__)
            if isinstance(exc, ray.exceptions.RayActorError) and self._named_tree:
                self._tree_actor = await asyncio.to_thread(
                    get_or_create_tree_actor, self._deployment_id.app_name, self._deployment_id.name,
                    self._max_blocks_per_replica)
            return PrefixMatch()
