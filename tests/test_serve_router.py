"""PrefixAwareRequestRouter inside a real Ray Serve app (local Ray, two replicas, CPU only).

Each replica registers a distinct cached chain with the shared tree actor; requests that
carry a prefix of one replica's chain must be served by that replica, whatever the order.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import ray
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from router_stub import stub_router_app
from tierserve.cache.prefix_hash import hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing.serve_router import (
    PREFIX_HASHES_KWARG,
    request_block_hashes,
    routing_kwargs,
)

BS = 4
APP = "routing-test"


def replica_tokens(replica_id: str) -> list[int]:
    """A replica's own 3-block prompt, derived from its id (so the test can recompute it)."""
    data = list(replica_id.encode())[:12]
    return data + [0] * (12 - len(data))


def _pending(kwargs: dict) -> PendingRequest:
    async def make():
        return PendingRequest(args=[], kwargs=kwargs,
                              metadata=RequestMetadata(request_id="r", internal_request_id="r"))
    return asyncio.run(make())


def test_request_hash_contract():
    tokens = list(range(10))
    kw = routing_kwargs(tokens, BS)
    assert kw == {PREFIX_HASHES_KWARG: hash_blocks(tokens, BS)} and len(kw[PREFIX_HASHES_KWARG]) == 2
    assert request_block_hashes(_pending(kw)) == kw[PREFIX_HASHES_KWARG]
    assert request_block_hashes(_pending({})) == []
    assert request_block_hashes(None) == []
    with pytest.raises(InvalidParameterError) as e:
        request_block_hashes(_pending({PREFIX_HASHES_KWARG: [b"x"]}))
    assert e.value.field == PREFIX_HASHES_KWARG
    with pytest.raises(InvalidParameterError):
        request_block_hashes(_pending({PREFIX_HASHES_KWARG: "abc"}))


def test_queue_length_probe_deadline_defaults_and_environment_override():
    probe = ("from ray.serve.request_router import RequestRouter as R;"
             "from tierserve.routing.serve_router import PrefixAwareRequestRouter as P;"
             "print(R.queue_len_response_deadline_s, P.queue_len_response_deadline_s, "
             "P.max_queue_len_response_deadline_s)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0.1", "0.5", "2.0"]                 # Serve's default, then the router's
    env["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "3"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3.0", "3.0", "3.0"]                 # the variable wins; max never below it


@pytest.fixture(scope="module")
def serve_app(ray_session):  # the session-wide Ray + Serve (tests/ray_fixtures.py)
    yield from stub_router_app(APP, {"abs_threshold": 4, "rel_threshold": 1.5, "match_timeout_s": 2.0},
                               replica_tokens, BS)


def test_requests_go_to_the_replica_caching_their_prefix(serve_app):
    handle, tree = serve_app
    replicas = ray.get(tree.replicas.remote())
    assert len(replicas) == 2
    for _ in range(3):
        for rid in replicas:
            tokens = replica_tokens(rid) + [7] * 8              # its cached 3 blocks + 2 new ones
            got = handle.remote("hi", **routing_kwargs(tokens, BS)).result(timeout_s=30)
            assert got == rid


def test_tree_actor_follows_evictions(serve_app):
    handle, tree = serve_app
    rid = sorted(ray.get(tree.replicas.remote()))[1]
    chain = hash_blocks(replica_tokens(rid), BS)
    assert ray.get(tree.longest_match.remote(chain)) == {rid: 3}
    # Evict the first block: a gap at the start means no usable prefix at all.
    assert ray.get(tree.report.remote(rid, [], [chain[0]])) == 2
    assert ray.get(tree.longest_match.remote(chain)) == {}
    # the router's lookup: no match, and each candidate's cached block count (its tie-break)
    other = next(r for r in ray.get(tree.replicas.remote()) if r != rid)
    found = ray.get(tree.match.remote(chain, [rid, other, "unknown"], lower=False))
    assert (found.device, found.lower, found.cached) == ({}, {}, {rid: 2, other: 3, "unknown": 0})
    # Re-reporting restores the match, and routing follows it.
    ray.get(tree.report.remote(rid, [chain], []))
    assert ray.get(tree.longest_match.remote(chain)) == {rid: 3}
    assert handle.remote("hi", **routing_kwargs(replica_tokens(rid), BS)).result(timeout_s=30) == rid
