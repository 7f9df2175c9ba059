"""PrefixAwareRequestRouter when its inputs fail, inside real Ray Serve apps (tests/gated_router_stub.py).

Two stub replicas each report a distinct 3-block chain to the app's real tree actor and answer with their
replica id. The observable: one call is held open on replica X (the router's load of X is then 1, of Y 0),
and a second call carries X's chain. With routing intact it goes to X (a 3-block match beats a load gap of
1 < ``abs_threshold`` 4, routing/policy.py); routed by load alone it goes to Y. Every call is answered:

* the tree lookup exceeds ``match_timeout_s`` (1 us: an actor round trip is ~1 ms, so every lookup times out);
* the tree actor is killed: calls route by load, the router recreates the named actor, and once a replica
  reports to the new one prefix routing resumes;
* request kwargs carry malformed hashes: routed by load, with a warning naming ``prefix_block_hashes``;
* a replica report carries malformed hashes: the tree refuses it whole, naming the part, and stays as it was.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import ray
from gated_router_stub import gated_router_app, new_gate
from polling import wait_for

from tierserve.cache.prefix_hash import HASH_BYTES, hash_blocks
from tierserve.errors import InvalidParameterError
from tierserve.routing.serve_router import routing_kwargs
from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name

BS = 4
APP = "routing-fallback"
ROUTER_LOGGER = "tierserve.routing.serve_router"
_gates = itertools.count()


def replica_tokens(replica_id: str) -> list[int]:
    """A replica's own 3-block prompt, derived from its id (the stub replicas report exactly this)."""
    data = list(replica_id.encode())[:12]
    return data + [0] * (12 - len(data))


def prefix_of(replica_id: str) -> dict:
    return routing_kwargs(replica_tokens(replica_id) + [7] * 8, BS)  # its 3 cached blocks + 2 new ones


def ask(handle, **kwargs) -> str:
    return handle.remote("hi", **kwargs).result(timeout_s=60)


def second_call_goes_to(handle, first: dict, second: dict) -> tuple[str, str]:
    """Hold a call with kwargs ``first`` open on the replica X it is routed to, then make a call with
    ``second`` (where ``second`` may name X's chain, see ``prefix_of``); returns (X, where the second went)."""
    name = f"gate-{next(_gates)}"
    gate = new_gate(name)
    try:
        held = handle.remote("hi", gate=name, **first)
        (x,) = wait_for(lambda: ray.get(gate.arrived.remote()))
        went = ask(handle, **second(x) if callable(second) else second)
        ray.get(gate.open.remote())
        assert held.result(timeout_s=60) == x
        return x, went
    finally:
        ray.kill(gate)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ROUTER_LOGGER and r.levelno == logging.WARNING]


def tree_of(app: str):
    return ray.get_actor(tree_actor_name(app, "Worker"), namespace=TREE_NAMESPACE)


@pytest.fixture
def timeout_app(ray_session):
    # inflight_ttl_s 0: the stubs never cache what they serve, so only the tree may speak for them here
    yield from gated_router_app(f"{APP}-timeout", {"match_timeout_s": 1e-6, "inflight_ttl_s": 0}, replica_tokens,
                                BS)


@pytest.fixture(scope="module")
def app(ray_session):
    yield from gated_router_app(APP, {"match_timeout_s": 2.0, "inflight_ttl_s": 0}, replica_tokens, BS)


@pytest.fixture(scope="module")
def inflight_app(ray_session):  # prefixes in flight tracked (the default)
    yield from gated_router_app(f"{APP}-inflight", {"match_timeout_s": 2.0}, replica_tokens, BS)


def test_intact_routing_follows_the_prefix_over_a_load_gap_of_one(app):
    low, high = sorted(ray.get(tree_of(APP).replicas.remote()))
    for owner in (low, high):
        assert second_call_goes_to(app, prefix_of(owner), prefix_of) == (owner, owner)


def test_a_prompt_in_flight_draws_a_follower_before_any_report(inflight_app, app):
    """A 5-block prompt no replica reported: the first call is held open on X. The router sent it there, so
    the same prompt follows it to X over a load gap of one (routing/inflight.py); without the record (``app``,
    ``inflight_ttl_s`` 0) the follower goes by load to the other replica, as does a different prompt."""
    for i, (handle, follows) in enumerate(((inflight_app, True), (app, False))):
        prompt = routing_kwargs([100 + i] * 20, BS)
        x, went = second_call_goes_to(handle, prompt, prompt)
        assert (went == x) is follows
    x, went = second_call_goes_to(inflight_app, routing_kwargs([110] * 20, BS), routing_kwargs([111] * 20, BS))
    assert went != x


def test_lookup_over_match_timeout_routes_by_load(timeout_app, caplog):
    tree = tree_of(f"{APP}-timeout")
    low, high = sorted(ray.get(tree.replicas.remote()))
    assert ray.get(tree.longest_match.remote(hash_blocks(replica_tokens(high), BS))) == {high: 3}  # tree is fine
    caplog.set_level(logging.WARNING, logger=ROUTER_LOGGER)
    x, went = second_call_goes_to(timeout_app, prefix_of(high), prefix_of)
    assert went == ({low, high} - {x}).pop()                          # by load, away from its prefix holder
    assert warnings_of(caplog).count("prefix tree lookup failed (TimeoutError); routing by load only") == 2


def test_killed_tree_routes_by_load_then_recreated_tree_resumes(app, caplog):
    tree = tree_of(APP)
    low, high = sorted(ray.get(tree.replicas.remote()))
    caplog.set_level(logging.WARNING, logger=ROUTER_LOGGER)
    ray.kill(tree, no_restart=True)
    x, went = second_call_goes_to(app, prefix_of(high), prefix_of)
    assert went == ({low, high} - {x}).pop()                          # by load: the tree is gone
    assert any(m.startswith("prefix tree lookup failed (") and "ActorDiedError" in m
               for m in warnings_of(caplog)), warnings_of(caplog)
    successor = wait_for(lambda: _named(tree_actor_name(APP, "Worker")))  # the router recreated it, empty
    assert ray.get(successor.replicas.remote()) == []
    for rid in (low, high):                                           # as the replicas' reports would
        ray.get(successor.report.remote(rid, [hash_blocks(replica_tokens(rid), BS)]))
    assert second_call_goes_to(app, prefix_of(high), prefix_of) == (high, high)  # prefix routing resumed


def _named(name: str):
    try:
        return ray.get_actor(name, namespace=TREE_NAMESPACE)
    except ValueError:
        return None


@pytest.mark.parametrize("value,detail", [
    ([b"x"], f"item 0 must be {HASH_BYTES} bytes"),
    ("not a list", "must be a list of bytes, got str"),
    ([bytes(HASH_BYTES), 17], f"item 1 must be {HASH_BYTES} bytes"),
])
def test_malformed_request_hashes_route_by_load_with_a_warning(app, caplog, value, detail):
    low, high = sorted(ray.get(tree_of(APP).replicas.remote()))
    caplog.set_level(logging.WARNING, logger=ROUTER_LOGGER)
    x, went = second_call_goes_to(app, prefix_of(high), {"prefix_block_hashes": value})
    assert (x, went) == (high, low)                                   # answered, by load
    assert [m for m in warnings_of(caplog) if m.startswith("routing by load only: prefix_block_hashes: ")
            and detail in m], warnings_of(caplog)


@pytest.mark.parametrize("chains,evicted,field,detail", [
    ([[b"short"]], [], "added_chains", f"chain 1 block 0 must be a {HASH_BYTES}-byte block hash, got 5 bytes"),
    ([None], [], "added_chains", "chain 1 must be a list of block hashes, got NoneType"),
    ([], ["a str"], "evicted", f"item 1 must be a {HASH_BYTES}-byte block hash, got str"),
])
def test_malformed_replica_report_is_refused_whole(app, chains, evicted, field, detail):
    tree = tree_of(APP)
    high = max(ray.get(tree.replicas.remote()))
    chain = hash_blocks(replica_tokens(high), BS)
    before = ray.get(tree.num_blocks.remote(high))
    fresh = hash_blocks(replica_tokens(high)[:4] + [99] * 8, BS)   # a valid new chain sent in the same report
    with pytest.raises(InvalidParameterError) as e:             # crosses the actor boundary typed
        ray.get(tree.report.remote(high, [fresh, *chains], [chain[0], *evicted]))
    assert (e.value.field, e.value.detail) == (field, detail)
    # nothing of the report was applied: neither the valid chain nor the valid eviction
    assert ray.get(tree.num_blocks.remote(high)) == before
    assert ray.get(tree.longest_match.remote(chain)) == {high: 3}
    assert ask(app, **prefix_of(high)) == high                        # routing unaffected
