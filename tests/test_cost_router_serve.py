"""Router v2 (``policy: cost_aware``) inside a real Ray Serve app: replicas' routing stats reach the policy.

Two stub replicas (tests/router_stub.py) each cache their own 3-block chain. While both report no
queued prefill, a request extending a replica's chain goes to it (cost 2 new blocks against 5); once
that replica reports 10,000 queued prompt tokens through ``record_routing_stats`` the same request goes
to the other one, and back when the queue clears. The pure ``replica_load`` conversion is checked exactly.
"""

from __future__ import annotations

import time

import pytest
import ray
from router_stub import stub_router_app

from tierserve.routing.policy import ReplicaLoad
from tierserve.routing.serve_router import replica_load, routing_kwargs, routing_stats

BS = 4
APP = "cost-routing-test"
BOARD = "cost-routing-test-loads"


def replica_tokens(replica_id: str) -> list[int]:
    data = list(replica_id.encode())[:12]
    return data + [0] * (12 - len(data))


def test_replica_load_from_routing_stats():
    stats = routing_stats(300, 32, 512)
    assert stats == {"pending_prefill_tokens": 300, "max_num_seqs": 32, "token_budget": 512}
    assert replica_load("a", 2, stats) == ReplicaLoad("a", 2, 300, 32, 512)
    # nothing reported yet, a partial or a bad report: in-flight count only, the policy's capacity
    assert replica_load("a", 2, None) == ReplicaLoad("a", 2)
    assert replica_load("a", 2, {"pending_prefill_tokens": 5}) == ReplicaLoad("a", 2)
    assert replica_load("a", 2, {**stats, "max_num_seqs": 0}) == ReplicaLoad("a", 2)
    assert replica_load("a", 2, {**stats, "token_budget": "512"}) == ReplicaLoad("a", 2)
    # the prefix tree's block count rides along either way
    assert replica_load("a", 2, stats, 40) == ReplicaLoad("a", 2, 300, 32, 512, cached_blocks=40)
    assert replica_load("a", 2, None, 40) == ReplicaLoad("a", 2, cached_blocks=40)


@pytest.fixture(scope="module")
def serve_app(ray_session):
    # A light decode weight: Serve's in-flight counts (its queue-length cache) may lag by a request or two
    # between these sequential calls; each counts 0.5 tokens of work, far below the 12 tokens a's cached
    # blocks save.
    kwargs = {"policy": "cost_aware", "block_size": BS, "token_budget": 64, "max_num_seqs": 64,
              "decode_tokens": 0.5, "match_timeout_s": 2.0, "inflight_ttl_s": 0}
    for handle, tree in stub_router_app(APP, kwargs, replica_tokens, BS, load_board=BOARD):
        yield handle, tree, ray.get_actor(BOARD)


def _route_until(handle, tokens, want: str, timeout_s: float = 20.0) -> list[str]:
    """Send the request until it lands on ``want`` three times in a row (routing stats arrive
    every 0.2 s plus the controller's broadcast); returns the replicas seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(handle.remote("hi", **routing_kwargs(tokens, BS)).result(timeout_s=30))
        if seen[-3:] == [want] * 3:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"never settled on {want}: {seen}")


def test_queued_prefill_reported_by_a_replica_moves_its_requests(serve_app):
    handle, tree, board = serve_app
    a, b = sorted(ray.get(tree.replicas.remote()))
    tokens = replica_tokens(a) + [7] * 8                         # a's 3 cached blocks + 2 new ones
    for _ in range(3):
        assert handle.remote("hi", **routing_kwargs(tokens, BS)).result(timeout_s=30) == a
    ray.get(board.set.remote(a, routing_stats(10_000, 64, 64)))
    _route_until(handle, tokens, b)
    ray.get(board.set.remote(a, routing_stats(0, 64, 64)))
    _route_until(handle, tokens, a)


def test_app_builds_the_cost_router_from_the_engine_config():
    import inspect

    from tierserve.routing.serve_router import PrefixAwareRequestRouter
    from tierserve.server.app import ROUTER_CLASS, ROUTING_STATS_PERIOD_S, build_app

    app = build_app({"router": "cost", "block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 512,
                     "router_decode_tokens": 2.0})
    worker = app._bound_deployment.init_args[0]._bound_deployment
    router = worker._deployment_config.request_router_config
    assert router.request_router_class == ROUTER_CLASS
    assert router.request_routing_stats_period_s == ROUTING_STATS_PERIOD_S
    assert router.request_router_kwargs == {"policy": "cost_aware", "block_size": 32, "token_budget": 512,
                                            "max_num_seqs": 8, "decode_tokens": 2.0, "kv_tiers": []}
    assert set(router.request_router_kwargs) <= set(inspect.signature(PrefixAwareRequestRouter.initialize_state).parameters)
