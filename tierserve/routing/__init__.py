"""Prefix-aware routing: a pure policy over block-hash prefix trees, plus a Ray Serve adapter.

Import the Ray pieces from their modules (``tierserve.routing.serve_router``,
``tierserve.routing.tree_actor``); this package imports neither Ray nor torch.
"""

from tierserve.routing.policy import (
    POLICIES,
    CostAwarePolicy,
    PrefixAwarePolicy,
    ReplicaLoad,
    RouteDecision,
    RouterPolicy,
    make_policy,
)
from tierserve.routing.prefix_tree import PrefixTree
from tierserve.routing.tier_index import TierDiff, TierIndex, lower_tier_matches

__all__ = [
    "POLICIES",
    "CostAwarePolicy",
    "PrefixAwarePolicy",
    "PrefixTree",
    "ReplicaLoad",
    "RouteDecision",
    "RouterPolicy",
    "TierDiff",
    "TierIndex",
    "lower_tier_matches",
    "make_policy",
]
