"""Routing policy: longest cached prefix wins, unless that replica is overloaded.

Inputs are plain data: per replica the number of leading blocks of the request
it caches (``matches``, from ``PrefixTree.longest_match``) and its load
(``ReplicaLoad.ongoing_requests``). No Ray, no torch, no clock.

Algorithm of ``PrefixAwarePolicy.choose`` (every comparison is exact):

1. Prefix score of replica r:
   ``score(r) = w_device * matches[r] + sum_t w_t * lower_matches[t][r]``
   with ``tier_weights`` (default ``{"device": 1.0}``: only blocks already in
   the replica's device KV pages count). Lower tiers (``"dram"``, ``"disk"``,
   ``"redis"``...) are a hook: give them a weight and pass their per-replica
   partial matches in ``lower_tier_matches``; a tier without a weight is an
   error, not silently ignored.
   ``KV_TIER_WEIGHTS`` are the weights for the KV tiers of
   cache/tiers/connector.py: device 1.0, dram 0.8, disk 0.5, redis 0.3. A
   lower-tier block saves its prefill minus its load, so its weight is about
   ``1 - TTFT(hit) / TTFT(recompute)`` of benchmarks/kv_reuse.py, rounded
   down for the tier's variance (Redis crosses the network and is shared by
   every replica, so it mostly separates "some replica can reuse this" from
   "no match" and adds little between replicas). A request whose first 10
   blocks sit in replica A's DRAM (score 8.0) goes to A over replica B with
   6 device blocks (score 6.0), but B wins with 9 device blocks (9.0).
2. least = the replica with the lowest (ongoing_requests, replica_id).
3. If no replica has score > 0: pick ``least`` (reason ``"no_match"``).
4. best = the replica with the highest score; ties go to the lower
   (ongoing_requests, replica_id).
4b. Short match: when the caller passes the request's length in blocks
   ``num_request_blocks`` and ``score(best) < min_match_ratio *
   num_request_blocks``, pick ``least`` (reason ``"short_match"``). Without
   it, a block or two every prompt shares (a chat template's header, a
   common instruction line) would pull every new conversation to the first
   replica that cached them, and the load bound (step 5) only steps in once
   the gap exceeds ``abs_threshold``. Default ``min_match_ratio = 0.1`` (the
   value of Ray Serve LLM's PrefixCacheAffinityRouter ``match_rate_threshold``);
   ``0`` turns the check off.
5. Load bound: if
   ``load(best) - load(least) > abs_threshold``  AND
   ``load(best) > rel_threshold * load(least)``
   the imbalance is too large: pick ``least`` (reason ``"least_loaded"``).
   Otherwise pick ``best`` (reason ``"prefix"``).

Defaults: ``abs_threshold = 4`` requests, ``rel_threshold = 1.5``,
``min_match_ratio = 0.1``. Both load thresholds must
hold, so a small absolute gap between idle replicas (1 vs 0: the relative test
passes, the absolute one does not) keeps the cache hit, and a large absolute
gap between busy replicas (40 vs 34: absolute passes, 40 <= 1.5 * 34) keeps it
too. With ``load(least) == 0`` the relative test is ``load(best) > 0``, so
only the absolute threshold bounds it. ``abs_threshold = 0`` and
``rel_threshold = 1.0`` make the policy nearly pure least-loaded;
``abs_threshold = inf`` makes it pure longest-prefix.

``rank`` orders all replicas for a router that falls back when its first
choice rejects the request: it applies ``choose`` to the replicas not yet
ranked, repeatedly (O(n^2) for n replicas; n is a few dozen at most).

Tests (tests/test_routing_policy.py) check exact choices: which replica for
which prefix and load, both thresholds at and just past their boundaries,
tie-breaks, tier weights and the full ranking.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tierserve.errors import InvalidParameterError

DEVICE_TIER = "device"
#: Weights of a block found in each KV tier (module doc, step 1); pass as ``tier_weights``.
KV_TIER_WEIGHTS = {"device": 1.0, "dram": 0.8, "disk": 0.5, "redis": 0.3}
#: Reasons a decision can carry.
REASON_PREFIX = "prefix"
REASON_LEAST_LOADED = "least_loaded"
REASON_NO_MATCH = "no_match"
REASON_SHORT_MATCH = "short_match"


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's load as the router sees it (requests queued or running on it)."""

    replica_id: str
    ongoing_requests: int

    def __post_init__(self) -> None:
        if not isinstance(self.replica_id, str) or not self.replica_id:
            raise InvalidParameterError("replica_id", f"must be a non-empty str, got {self.replica_id!r}")
        if self.ongoing_requests < 0:
            raise InvalidParameterError(
                "ongoing_requests", f"must be >= 0, got {self.ongoing_requests} for {self.replica_id}")


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes and why.

    ``matched_blocks`` is the chosen replica's device-tier match (leading
    blocks it already caches); ``score`` the weighted score over tiers;
    ``reason`` one of ``"prefix"``, ``"least_loaded"`` (imbalance override),
    ``"no_match"``, ``"short_match"`` (best match below ``min_match_ratio``).
    """

    replica_id: str
    matched_blocks: int
    score: float
    reason: str


class RouterPolicy(ABC):
    """Contract: pick one replica from ``loads`` given per-replica prefix matches.

    ``matches`` maps replica id -> leading device blocks cached (missing = 0);
    replicas named in ``matches`` but absent from ``loads`` are not candidates.
    ``num_request_blocks`` (optional) is the request's length in blocks.
    ``choose`` is deterministic (same inputs, same decision) and never returns
    a replica outside ``loads``; ``rank`` returns every replica of ``loads``
    exactly once, most preferred first.
    """

    @abstractmethod
    def choose(self, matches: Mapping[str, int], loads: Sequence[ReplicaLoad],
               lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None,
               num_request_blocks: int | None = None) -> RouteDecision:
        ...

    def rank(self, matches: Mapping[str, int], loads: Sequence[ReplicaLoad],
             lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None,
             num_request_blocks: int | None = None) -> list[RouteDecision]:
        remaining = list(loads)
        ranked: list[RouteDecision] = []
        while remaining:
            decision = self.choose(matches, remaining, lower_tier_matches, num_request_blocks)
            ranked.append(decision)
            remaining = [r for r in remaining if r.replica_id != decision.replica_id]
        return ranked


class PrefixAwarePolicy(RouterPolicy):
    """Longest cached prefix, bounded by an absolute AND a relative load gap (see module doc)."""

    def __init__(self, abs_threshold: float = 4, rel_threshold: float = 1.5,
                 tier_weights: Mapping[str, float] | None = None, min_match_ratio: float = 0.1):
        if not abs_threshold >= 0:
            raise InvalidParameterError("abs_threshold", f"must be >= 0, got {abs_threshold}")
        if not rel_threshold >= 1.0:
            raise InvalidParameterError("rel_threshold", f"must be >= 1.0, got {rel_threshold}")
        if not 0 <= min_match_ratio <= 1:
            raise InvalidParameterError("min_match_ratio", f"must lie in [0, 1], got {min_match_ratio}")
        weights = dict(tier_weights) if tier_weights is not None else {DEVICE_TIER: 1.0}
        for tier, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise InvalidParameterError("tier_weights", f"weight of tier {tier!r} must be finite and >= 0, got {w!r}")
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.tier_weights = weights
        self.min_match_ratio = min_match_ratio

    def score(self, replica_id: str, matches: Mapping[str, int],
              lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None) -> float:
        """Weighted prefix score of one replica (module doc, step 1)."""
        total = self.tier_weights.get(DEVICE_TIER, 0.0) * matches.get(replica_id, 0)
        for tier, per_replica in (lower_tier_matches or {}).items():
            if tier not in self.tier_weights:
                raise InvalidParameterError(
                    "lower_tier_matches", f"tier {tier!r} has no weight; known tiers: {sorted(self.tier_weights)}")
            total += self.tier_weights[tier] * per_replica.get(replica_id, 0)
        return total

    def choose(self, matches: Mapping[str, int], loads: Sequence[ReplicaLoad],
               lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None,
               num_request_blocks: int | None = None) -> RouteDecision:
        _check_loads(loads)
        by_load = sorted(loads, key=lambda r: (r.ongoing_requests, r.replica_id))
        least = by_load[0]
        scores = {r.replica_id: self.score(r.replica_id, matches, lower_tier_matches) for r in loads}
        best = min(by_load, key=lambda r: -scores[r.replica_id])  # stable: ties keep load/id order
        if scores[best.replica_id] <= 0:
            return self._decide(least, matches, scores, REASON_NO_MATCH)
        if num_request_blocks is not None and scores[best.replica_id] < self.min_match_ratio * num_request_blocks:
            return self._decide(least, matches, scores, REASON_SHORT_MATCH)
        gap = best.ongoing_requests - least.ongoing_requests
        if gap > self.abs_threshold and best.ongoing_requests > self.rel_threshold * least.ongoing_requests:
            return self._decide(least, matches, scores, REASON_LEAST_LOADED)
        return self._decide(best, matches, scores, REASON_PREFIX)

    @staticmethod
    def _decide(replica: ReplicaLoad, matches: Mapping[str, int], scores: Mapping[str, float],
                reason: str) -> RouteDecision:
        rid = replica.replica_id
        return RouteDecision(replica_id=rid, matched_blocks=matches.get(rid, 0), score=scores[rid], reason=reason)


#: Policies by name, for configs (``request_router_kwargs: {policy: ...}``).
POLICIES: dict[str, type[RouterPolicy]] = {"prefix_aware": PrefixAwarePolicy}


def make_policy(name: str, **kwargs) -> RouterPolicy:
    """Build a registered policy by name; unknown names raise naming the choices."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidParameterError("policy", f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return cls(**kwargs)


def _check_loads(loads: Sequence[ReplicaLoad]) -> None:
    if not loads:
        raise InvalidParameterError("loads", "must name at least one replica")
    seen: set[str] = set()
    for r in loads:
        if r.replica_id in seen:
            raise InvalidParameterError("loads", f"replica {r.replica_id!r} appears twice")
        seen.add(r.replica_id)
