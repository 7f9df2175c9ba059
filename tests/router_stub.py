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


def stub_router_app(app: str, router_kwargs: dict, first_tokens: Callable[[str], list[int]], block_size: int):
    """Generator for a module fixture: deploy, yield (handle, tree actor), delete the app and its tree."""
    modules = {sys.modules[__name__], sys.modules[first_tokens.__module__]}
    for m in modules:
        cloudpickle.register_pickle_by_value(m)

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                      request_router_config=RequestRouterConfig(request_router_class=PrefixAwareRequestRouter,
                                                                request_router_kwargs=router_kwargs))
    class Worker:
        def __init__(self):
            from tierserve.routing.tree_actor import get_or_create_tree_actor

            ctx = serve.get_replica_context()
            self.replica_id = ctx.replica_id.unique_id
            tree = get_or_create_tree_actor(ctx.app_name, ctx.deployment)
            ray.get(tree.report.remote(self.replica_id, [hash_blocks(first_tokens(self.replica_id), block_size)]))

        def __call__(self, prompt: str, prefix_block_hashes=None) -> str:
            return self.replica_id

    try:
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
