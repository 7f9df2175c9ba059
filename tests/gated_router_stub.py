"""A two-replica stub app behind PrefixAwareRequestRouter whose calls can be held open, for fallback tests.

Like tests/router_stub.py, each replica reports ``hash_blocks(first_tokens(replica_id), block_size)`` to the
app's tree actor at start and answers with its replica id. A call made with ``gate=<name>`` first waits on
the ``Gate`` actor of that name (which records which replica is waiting) until the test opens it, so the
test can keep one request in flight on one replica: the router's load then differs by exactly one between
the replicas, which makes routing by load observable. The replicas cannot import test modules: this module
and ``first_tokens``'s module are shipped by value.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import ray
from ray import cloudpickle, serve
from ray.serve.config import RequestRouterConfig

from tierserve.cache.prefix_hash import hash_blocks
from tierserve.routing.serve_router import PrefixAwareRequestRouter
from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name


class Gate:
    """Async actor body: calls wait until ``open``; ``arrived`` lists the replicas waiting or let through."""

    def __init__(self):
        self._open = asyncio.Event()
        self._arrived: list[str] = []

    async def wait(self, replica_id: str) -> None:
        self._arrived.append(replica_id)
        await self._open.wait()

    def open(self) -> None:
        self._open.set()

    def arrived(self) -> list[str]:
        return list(self._arrived)


def gated_router_app(app: str, router_kwargs: dict, first_tokens: Callable[[str], list[int]], block_size: int):
    """Generator for a fixture: deploy, yield the handle, delete the app and whatever tree actor holds its name."""
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

        async def __call__(self, prompt: str, prefix_block_hashes=None, gate: str | None = None) -> str:
            if gate is not None:
                await ray.get_actor(gate).wait.remote(self.replica_id)
            return self.replica_id

    try:
        handle = serve.run(Worker.bind(), name=app, route_prefix=None)
    finally:
        for m in modules:
            cloudpickle.unregister_pickle_by_value(m)
    try:
        yield handle
    finally:
        serve.delete(app)
        try:
            ray.kill(ray.get_actor(tree_actor_name(app, "Worker"), namespace=TREE_NAMESPACE))
        except ValueError:  # no tree actor under that name now
            pass


def new_gate(name: str):
    """A ``Gate`` actor named ``name`` (kill it when done)."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the actor's process cannot import this test module
    try:
        return ray.remote(num_cpus=0)(Gate).options(name=name).remote()
    finally:
        cloudpickle.unregister_pickle_by_value(module)
