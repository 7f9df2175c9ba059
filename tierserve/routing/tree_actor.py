"""The shared prefix tree: one named Ray actor per Serve deployment.

Worker replicas push what their device KV cache holds as diffs
(``report(replica_id, added_chains, evicted)``: chains of chained block
hashes, plus evicted hashes); every router (in each ingress replica, proxy or
driver holding a handle) asks ``longest_match(hashes)``. Only ids and 32-byte
digests cross the actor boundary, never KV.

Lower KV tiers (app with ``kv_tiers``): a replica adds ``tiers=TierDiff`` to
its report (the chunk keys its DRAM/disk tiers gained and lost, and the Redis
keys it stored, loaded or found missing; routing/tier_index.py), and a router
asks ``match(hashes, replica_ids)`` for a ``PrefixMatch``: the device match
plus, per candidate replica, the blocks each lower tier would serve after it
(chunk aligned, never double counted). ``drop_replica`` forgets a replica's
device blocks and its DRAM/disk chunks; the shared Redis keys stay.

The actor is named ``tree_actor_name(app, deployment)`` in the namespace
``TREE_NAMESPACE`` and created with ``get_if_exists=True`` and
``lifetime="detached"``, so whichever process comes first creates it and it
outlives any single replica (a replica restart must not lose the other
replicas' reports). A report is checked whole before any of it is applied
(``check_report``: 32-byte digests in lists), so a malformed one is refused
with an error naming the part and changes nothing. If the actor itself dies
(killed, its node lost), routers route by load until they find the
recreated one (routing/serve_router.py). It is a plain synchronous actor: calls run one at a time,
so a diff is applied atomically with respect to lookups. It asks for 0 CPUs
so it never competes with model replicas for slots.

Tests (tests/test_serve_router.py) run it in a local Ray instance behind a
real Serve deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tierserve.cache.prefix_hash import HASH_BYTES
from tierserve.errors import InvalidParameterError
from tierserve.routing.prefix_tree import PrefixTree
from tierserve.routing.tier_index import DEFAULT_MAX_REDIS_CHUNKS, TierDiff, TierIndex

#: Ray namespace of every tierserve prefix-tree actor.
TREE_NAMESPACE = "tierserve"


def tree_actor_name(app_name: str, deployment_name: str) -> str:
    """Name of the tree actor serving one deployment of one Serve app."""
    return f"prefix-tree:{app_name}:{deployment_name}"


@dataclass(frozen=True)
class PrefixMatch:
    """A request's matches: ``device`` replica -> leading device blocks (``PrefixTree.longest_match``),
    ``lower`` tier -> replica -> blocks that tier serves after them (``TierIndex.match``);
    the arguments ``matches`` and ``lower_tier_matches`` of ``RouterPolicy.choose``. ``cached``: candidate
    replica -> device blocks it caches in all (``ReplicaLoad.cached_blocks``, the policies' tie-break)."""

    device: dict[str, int] = field(default_factory=dict)
    lower: dict[str, dict[str, int]] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)


class PrefixTreeActor:
    """Actor body: a ``PrefixTree`` (device blocks) and a ``TierIndex`` (lower-tier chunks)."""

    def __init__(self, max_blocks_per_replica: int | None = None,
                 max_redis_chunks: int | None = DEFAULT_MAX_REDIS_CHUNKS):
        self._tree = PrefixTree(max_blocks_per_replica=max_blocks_per_replica)
        self._tiers = TierIndex(max_redis_chunks=max_redis_chunks)

    def report(self, replica_id: str, added_chains: Sequence[Sequence[bytes]] = (),
               evicted: Iterable[bytes] = (), tiers: TierDiff | None = None) -> int:
        """Apply one replica's diff (evictions first, then additions); returns its device block count.

        The whole diff is checked first (``check_report``): a malformed one raises ``InvalidParameterError``
        naming the part and leaves the tree as it was.
        """
        evicted = list(evicted)
        check_report(replica_id, added_chains, evicted)
        self._tree.evict(replica_id, evicted)
        for chain in added_chains:
            self._tree.add_chain(replica_id, chain)
        if tiers is not None:
            self._tiers.apply(replica_id, tiers)
        return self._tree.num_blocks(replica_id)

    def longest_match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        return self._tree.longest_match(hashes)

    def match(self, hashes: Sequence[bytes], replica_ids: Iterable[str], lower: bool = True) -> PrefixMatch:
        """Device matches of ``hashes``, the candidate ``replica_ids``' block counts and, with ``lower``, their
        lower-tier matches."""
        device = self._tree.longest_match(hashes)
        ids = list(replica_ids)
        cached = {r: self._tree.num_blocks(r) for r in ids}
        return PrefixMatch(device, self._tiers.match(hashes, device, ids) if lower else {}, cached)

    def num_tier_chunks(self, tier: str, replica_id: str | None = None) -> int:
        return self._tiers.num_chunks(tier, replica_id)

    def drop_replica(self, replica_id: str) -> int:
        self._tiers.drop_replica(replica_id)
        return self._tree.drop_replica(replica_id)

    def retain_replicas(self, live_replica_ids: Iterable[str]) -> list[str]:
        """Forget every replica not in ``live_replica_ids``; returns the ones dropped."""
        live = set(live_replica_ids)
        known = set(self._tree.replicas()) | set(self._tiers.replicas())
        gone = sorted(r for r in known if r not in live)
        for r in gone:
            self.drop_replica(r)
        return gone

    def replicas(self) -> list[str]:
        return self._tree.replicas()

    def num_blocks(self, replica_id: str | None = None) -> int:
        return self._tree.num_blocks(replica_id)


def check_report(replica_id: str, added_chains: Sequence[Sequence[bytes]], evicted: Sequence[bytes]) -> None:
    """Raise ``InvalidParameterError`` unless the replica id is a non-empty str, ``added_chains`` a list of lists
    and every digest in them and in ``evicted`` a ``HASH_BYTES``-byte ``bytes`` (the chained block hashes of
    cache/prefix_hash.py)."""
    if not isinstance(replica_id, str) or not replica_id:
        raise InvalidParameterError("replica_id", f"must be a non-empty str, got {replica_id!r:.40}")
    if not isinstance(added_chains, (list, tuple)):
        raise InvalidParameterError("added_chains", f"must be a list of chains, got {type(added_chains).__name__}")
    for c, chain in enumerate(added_chains):
        if not isinstance(chain, (list, tuple)):
            raise InvalidParameterError("added_chains", f"chain {c} must be a list of block hashes, "
                                                        f"got {type(chain).__name__}")
        for i, digest in enumerate(chain):
            _check_digest("added_chains", f"chain {c} block {i}", digest)
    for i, digest in enumerate(evicted):
        _check_digest("evicted", f"item {i}", digest)


def _check_digest(field_name: str, where: str, digest) -> None:
    if not isinstance(digest, bytes) or len(digest) != HASH_BYTES:
        got = f"{len(digest)} bytes" if isinstance(digest, (bytes, bytearray)) else type(digest).__name__
        raise InvalidParameterError(field_name, f"{where} must be a {HASH_BYTES}-byte block hash, got {got}")


def get_or_create_tree_actor(app_name: str, deployment_name: str,
                             max_blocks_per_replica: int | None = None):
    """Handle to the deployment's tree actor, creating it if nobody has yet.

    Must be called in a process connected to Ray. The first caller's
    ``max_blocks_per_replica`` wins.
    """
    import ray

    return ray.remote(num_cpus=0)(PrefixTreeActor).options(
        name=tree_actor_name(app_name, deployment_name),
        namespace=TREE_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote(max_blocks_per_replica)
