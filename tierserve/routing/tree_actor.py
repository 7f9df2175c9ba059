"""The shared prefix tree: one named Ray actor per Serve deployment.

Worker replicas push what their device KV cache holds as diffs
(``report(replica_id, added_chains, evicted)``: chains of chained block
hashes, plus evicted hashes); every router (in each ingress replica, proxy or
driver holding a handle) asks ``longest_match(hashes)``. Only ids and 32-byte
digests cross the actor boundary, never KV.

The actor is named ``tree_actor_name(app, deployment)`` in the namespace
``TREE_NAMESPACE`` and created with ``get_if_exists=True`` and
``lifetime="detached"``, so whichever process comes first creates it and it
outlives any single replica (a replica restart must not lose the other
replicas' reports). It is a plain synchronous actor: calls run one at a time,
so a diff is applied atomically with respect to lookups. It asks for 0 CPUs
so it never competes with model replicas for slots.

Tests (tests/test_serve_router.py) run it in a local Ray instance behind a
real Serve deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tierserve.routing.prefix_tree import PrefixTree

#: Ray namespace of every tierserve prefix-tree actor.
TREE_NAMESPACE = "tierserve"


def tree_actor_name(app_name: str, deployment_name: str) -> str:
    """Name of the tree actor serving one deployment of one Serve app."""
    return f"prefix-tree:{app_name}:{deployment_name}"


class PrefixTreeActor:
    """Actor body: a ``PrefixTree`` plus bulk diff application."""

    def __init__(self, max_blocks_per_replica: int | None = None):
        self._tree = PrefixTree(max_blocks_per_replica=max_blocks_per_replica)

    def report(self, replica_id: str, added_chains: Sequence[Sequence[bytes]] = (),
               evicted: Iterable[bytes] = ()) -> int:
        """Apply one replica's diff (evictions first, then additions); returns its block count."""
        self._tree.evict(replica_id, evicted)
        for chain in added_chains:
            self._tree.add_chain(replica_id, chain)
        return self._tree.num_blocks(replica_id)

    def longest_match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        return self._tree.longest_match(hashes)

    def drop_replica(self, replica_id: str) -> int:
        return self._tree.drop_replica(replica_id)

    def retain_replicas(self, live_replica_ids: Iterable[str]) -> list[str]:
        """Forget every replica not in ``live_replica_ids``; returns the ones dropped."""
        live = set(live_replica_ids)
        gone = [r for r in self._tree.replicas() if r not in live]
        for r in gone:
            self._tree.drop_replica(r)
        return gone

    def replicas(self) -> list[str]:
        return self._tree.replicas()

    def num_blocks(self, replica_id: str | None = None) -> int:
        return self._tree.num_blocks(replica_id)


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
