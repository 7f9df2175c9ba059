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
2. least = the replica with the lowest (ongoing_requests, cached_blocks, replica_id): among replicas
   with as many requests in flight, the one whose device cache holds the fewest blocks (the prefix
   tree's count; 0 when unknown). Without it every cold prompt that found its candidates equally loaded
   went to the lowest id, so with a few shared prompts one replica could cache them all while another
   never got a request (benchmarks/serve.py, four prompts over four replicas: 27/22/15/0).
3. If no replica has score > 0: pick ``least`` (reason ``"no_match"``).
4. best = the replica with the highest score; ties go to the lower
   (ongoing_requests, cached_blocks, replica_id).
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

Router v2: ``CostAwarePolicy`` (registry name ``"cost_aware"``) scores each
replica by the work the request would cost it, Dynamo/llm-d style, in units of
one step's token budget (roughly: engine steps of delay), and picks the
cheapest:

    cost(r) = (new_tokens(r) + pending_prefill_tokens(r)
               + decode_tokens * (ongoing_requests(r) + behind(r))) / token_budget(r)
    new_tokens(r) = block_size * (n - score(r))
    behind(r) = max(0, ongoing_requests(r) + 1 - max_num_seqs(r))

* ``score(r)`` is the weighted prefix score of step 1 above (device blocks
  1.0, lower tiers at ``tier_weights``), so a DRAM block still costs
  ``0.2 * block_size`` tokens of work; ``n`` is the request's length in blocks
  (``num_request_blocks``; without it, the best score among the candidates:
  the cost *differences*, hence the choice, do not depend on ``n`` as long as
  ``n >=`` every score, which the policy enforces).
* ``pending_prefill_tokens(r)``: prompt tokens already queued on the replica
  and not prefilled yet (waiting requests and unfinished chunked prefills,
  ``EngineStats.pending_prefill_tokens``, reported by the replica). They run
  before the new request's prefill under the same token budget.
* ``ongoing_requests(r)``: requests running or queued there (Serve's count).
  Each still adds its answer's decode tokens to the replica's steps; a decode
  token costs a batch row of a weight-streaming step, far more than a prompt
  token in a prefill chunk, so each request in flight counts as
  ``decode_tokens`` prompt tokens of work.
* ``behind(r)``: with every one of the replica's ``max_num_seqs`` slots
  taken, the request waits for that many requests to finish before it gets
  one; each wait counts another ``decode_tokens``.
* Capacity: ``token_budget`` (the scheduler's ``max_num_batched_tokens``) and
  ``max_num_seqs`` of the replica when it reports them, else the policy's
  (the deployment's engine config; every replica of a deployment shares it).

Constants (constructor arguments):

* ``block_size = 16`` tokens per KV block: the engine default; the Serve app
  passes its engine's.
* ``token_budget = 2048`` and ``max_num_seqs = 64``: SchedulerConfig defaults,
  the capacity of a replica that reported none; the app passes its own.
* ``decode_tokens = 256``: prompt tokens of work per request in flight. On
  the 2-core CPU host a prompt token prefills in ~1 ms within a chunk and a
  batch-1 decode step takes 15-25 ms, so an answer of 16 tokens (the
  benchmark's) weighs ~250-400 prompt tokens. Consequence: a cached match
  keeps a request on its replica only while it saves more than 256 tokens (16
  blocks) per extra request in flight there. A follow-up turn with 55 cached
  blocks (880 tokens) stays on a replica with up to 3 more requests in flight
  than an idle one and moves at 4; a shared 2-block header never outweighs
  one request. ``decode_tokens = 0`` is pure prefix-work routing (queued
  prefill and full slots still count), a huge one is least-loaded.

  The first form of this policy weighed requests in flight as
  ``decode_weight * ongoing / max_num_seqs`` step budgets (8 * 2048 / 64 =
  256 tokens each with the defaults). With a replica configured for few
  sequences that scaled each request in flight to thousands of tokens (4096
  at ``max_num_seqs = 4``, benchmarks/serve.py's replicas), so a single
  request in flight outweighed any cached prompt and the hit rate fell to
  power-of-two's (0.47 vs 0.46, against the prefix router's 0.74). The slot
  count now matters only where it binds (``behind``).

Ties on cost go to the lower (ongoing_requests, cached_blocks, replica_id), as in step 2: a request no
replica caches, arriving while several are idle, goes to the one caching least.

Short matches (``min_match_ratio``, default 0.1, as step 4b): when the caller passes the request's
length ``n`` and the best score is below ``min_match_ratio * n``, every score counts as 0 in the costs
(reason ``"short_match"``). A chat template's header or a common instruction line (1-2 blocks of a
50-block prompt) saves ~3% of the prefill, but it made every replica that had served any prompt cheaper
than an empty one, so with four shared prompts over four replicas two prompts went to one replica and
another replica got no request (benchmarks/serve.py: 32/17/15/0 with the tie-break above alone).
``0`` turns the check off. Reason of a
decision: ``"no_match"`` when no candidate scores > 0, ``"prefix"`` when the
chosen replica has the best score, ``"least_loaded"`` when load outweighed a
better match elsewhere. ``RouteDecision.cost`` carries the chosen cost.

Tests (tests/test_routing_policy.py) check exact choices: which replica for
which prefix and load, both thresholds at and just past their boundaries,
tie-breaks, tier weights and the full ranking; for ``CostAwarePolicy`` the
cost formula against hand-computed values, the crossover points of the
example above, queued prefill, per-replica capacity, lower tiers, and that
the choice does not depend on ``n``.
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
    #: prompt tokens queued on the replica, not prefilled yet (what it last reported; 0 if unknown)
    pending_prefill_tokens: int = 0
    #: the replica's capacity when it reported it (None: the policy's)
    max_num_seqs: int | None = None
    token_budget: int | None = None
    #: device KV blocks the replica caches (the prefix tree's count; 0 if unknown): a tie-break, module doc
    cached_blocks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.replica_id, str) or not self.replica_id:
            raise InvalidParameterError("replica_id", f"must be a non-empty str, got {self.replica_id!r}")
        if self.ongoing_requests < 0:
            raise InvalidParameterError(
                "ongoing_requests", f"must be >= 0, got {self.ongoing_requests} for {self.replica_id}")
        for name in ("pending_prefill_tokens", "cached_blocks"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(name, f"must be >= 0, got {getattr(self, name)} for {self.replica_id}")
        for name in ("max_num_seqs", "token_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidParameterError(name, f"must be >= 1, got {value} for {self.replica_id}")


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
    #: the chosen replica's cost (CostAwarePolicy; None for policies without one)
    cost: float | None = None


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
        weights = _check_weights(tier_weights)
        self.abs_threshold = abs_threshold
        self.rel_threshold = rel_threshold
        self.tier_weights = weights
        self.min_match_ratio = min_match_ratio

    def score(self, replica_id: str, matches: Mapping[str, int],
              lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None) -> float:
        """Weighted prefix score of one replica (module doc, step 1)."""
        return prefix_score(self.tier_weights, replica_id, matches, lower_tier_matches)

    def choose(self, matches: Mapping[str, int], loads: Sequence[ReplicaLoad],
               lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None,
               num_request_blocks: int | None = None) -> RouteDecision:
        _check_loads(loads)
        by_load = sorted(loads, key=_load_key)
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


class CostAwarePolicy(RouterPolicy):
    """Router v2: the replica the request costs least, prefill left plus queued work over capacity (module doc)."""

    def __init__(self, block_size: int = 16, token_budget: int = 2048, max_num_seqs: int = 64,
                 decode_tokens: float = 256.0, tier_weights: Mapping[str, float] | None = None,
                 min_match_ratio: float = 0.1):
        for name, value in (("block_size", block_size), ("token_budget", token_budget),
                            ("max_num_seqs", max_num_seqs)):
            if not (isinstance(value, int) and value >= 1):
                raise InvalidParameterError(name, f"must be an int >= 1, got {value!r}")
        if not (math.isfinite(decode_tokens) and decode_tokens >= 0):
            raise InvalidParameterError("decode_tokens", f"must be finite and >= 0, got {decode_tokens}")
        if not 0 <= min_match_ratio <= 1:
            raise InvalidParameterError("min_match_ratio", f"must lie in [0, 1], got {min_match_ratio}")
        self.min_match_ratio = min_match_ratio
        self.block_size = block_size
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.decode_tokens = decode_tokens
        self.tier_weights = _check_weights(tier_weights)

    def cost(self, load: ReplicaLoad, score: float, num_request_blocks: float) -> float:
        """Work the request would cost ``load``'s replica, in step budgets (module doc, Router v2)."""
        budget = load.token_budget or self.token_budget
        seqs = load.max_num_seqs or self.max_num_seqs
        new_tokens = self.block_size * (num_request_blocks - score)
        behind = max(0, load.ongoing_requests + 1 - seqs)
        return (new_tokens + load.pending_prefill_tokens
                + self.decode_tokens * (load.ongoing_requests + behind)) / budget

    def choose(self, matches: Mapping[str, int], loads: Sequence[ReplicaLoad],
               lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None,
               num_request_blocks: int | None = None) -> RouteDecision:
        _check_loads(loads)
        scores = {r.replica_id: prefix_score(self.tier_weights, r.replica_id, matches, lower_tier_matches)
                  for r in loads}
        best_score = max(scores.values())
        n = max(num_request_blocks or 0, best_score)
        short = (best_score > 0 and num_request_blocks is not None
                 and best_score < self.min_match_ratio * num_request_blocks)
        costs = {r.replica_id: self.cost(r, 0.0 if short else scores[r.replica_id], n) for r in loads}
        chosen = min(loads, key=lambda r: (costs[r.replica_id], *_load_key(r)))
        rid = chosen.replica_id
        if best_score <= 0:
            reason = REASON_NO_MATCH
        elif short:
            reason = REASON_SHORT_MATCH
        elif scores[rid] == best_score:
            reason = REASON_PREFIX
        else:
            reason = REASON_LEAST_LOADED
        return RouteDecision(rid, matches.get(rid, 0), scores[rid], reason, costs[rid])


#: Policies by name, for configs (``request_router_kwargs: {policy: ...}``).
POLICIES: dict[str, type[RouterPolicy]] = {"prefix_aware": PrefixAwarePolicy, "cost_aware": CostAwarePolicy}


def make_policy(name: str, **kwargs) -> RouterPolicy:
    """Build a registered policy by name; unknown names raise naming the choices."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidParameterError("policy", f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return cls(**kwargs)


def _load_key(r: ReplicaLoad) -> tuple[int, int, str]:
    """Order of replicas by load (module doc, step 2): requests in flight, blocks cached, id."""
    return r.ongoing_requests, r.cached_blocks, r.replica_id


def _check_loads(loads: Sequence[ReplicaLoad]) -> None:
    if not loads:
        raise InvalidParameterError("loads", "must name at least one replica")
    seen: set[str] = set()
    for r in loads:
        if r.replica_id in seen:
            raise InvalidParameterError("loads", f"replica {r.replica_id!r} appears twice")
        seen.add(r.replica_id)


def prefix_score(tier_weights: Mapping[str, float], replica_id: str, matches: Mapping[str, int],
                 lower_tier_matches: Mapping[str, Mapping[str, int]] | None = None) -> float:
    """Weighted prefix score of one replica (module doc, step 1); a tier without a weight raises."""
    total = tier_weights.get(DEVICE_TIER, 0.0) * matches.get(replica_id, 0)
    for tier, per_replica in (lower_tier_matches or {}).items():
        if tier not in tier_weights:
            raise InvalidParameterError(
                "lower_tier_matches", f"tier {tier!r} has no weight; known tiers: {sorted(tier_weights)}")
        total += tier_weights[tier] * per_replica.get(replica_id, 0)
    return total


def _check_weights(tier_weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(tier_weights) if tier_weights is not None else {DEVICE_TIER: 1.0}
    for tier, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise InvalidParameterError("tier_weights", f"weight of tier {tier!r} must be finite and >= 0, got {w!r}")
    return weights
