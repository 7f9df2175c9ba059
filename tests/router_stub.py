"""A two-replica Serve app of stub workers behind PrefixAwareRequestRouter, for routing tests.

Each replica reports ``hash_blocks(first_tokens(replica_id), block_size)`` to the
app's prefix-tree actor when it starts and answers every call with its replica
id, so a test sees exactly where the router sent a request. Needs the session
Ray + Serve (tests/ray_fixtures.py). The replicas cannot import test modules:
this module and ``first_tokens``'s module are shipped by value.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import ray
from ray import cloudpickle, serve
from ray.serve.config import RequestRouterConfig

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.routing.serve_router import PrefixAwareRequestRouter
from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name


class LoadBoard:
    """Actor body: the routing stats each stub replica reports (a test sets them by replica id)."""

    def __init__(self):
        self.stats: dict[str, dict] = {}

    def set(self, replica_id: str, stats: dict) -> None:
        self.stats[replica_id] = stats

    def get(self, replica_id: str) -> dict:
        return self.stats.get(replica_id, {})


def stub_router_app(app: str, router_kwargs: dict, first_tokens: Callable[[str], list[int]], block_size: int,
                    load_board: str | None = None):
    """Generator for a module fixture: deploy, yield (handle, tree actor), delete the app and its tree.

    With ``load_board`` (a name) a ``LoadBoard`` actor of that name is created first (and killed
    last); each replica's ``record_routing_stats`` returns what the board holds for it, pulled by
    Serve every 0.2 s.
    """
    modules = {sys.modules[__name__], sys.modules[first_tokens.__module__]}
    for m in modules:
        cloudpickle.register_pickle_by_value(m)

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                      request_router_config=RequestRouterConfig(request_router_class=PrefixAwareRequestRouter,
                                                                request_router_kwargs=router_kwargs,
                                                                request_routing_stats_period_s=0.2))
    class Worker:
        def __init__(self):
            from tierserve.routing.tree_actor import get_or_create_tree_actor

            ctx = serve.get_replica_context()
            self.replica_id = ctx.replica_id.unique_id
            tree = get_or_create_tree_actor(ctx.app_name, ctx.deployment)
            ray.get(tree.report.remote(self.replica_id, [hash_blocks(first_tokens(self.replica_id), block_size)]))

        def __call__(self, prompt: str, prefix_block_hashes=None) -> str:
            return self.replica_id

        async def record_routing_stats(self) -> dict:
            if load_board is None:
                return {}
            return await ray.get_actor(load_board).get.remote(self.replica_id)

    board = None
    try:
        if load_board is not None:
            board = ray.remote(num_cpus=0)(LoadBoard).options(name=load_board).remote()
        handle = serve.run(Worker.bind(), name=app, route_prefix=None)
    finally:
        for m in modules:
            cloudpickle.unregister_pickle_by_value(m)
    tree = ray.get_actor(tree_actor_name(app, "Worker"), namespace=TREE_NAMESPACE)
    try:
        yield handle, tree
    finally:
        serve.delete(app)
        ray.kill(tree)
        if board is not None:
            ray.kill(board)
