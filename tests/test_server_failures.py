"""Replica death under load, live: a worker replica's process is killed (SIGKILL) while it streams one
request, generates a non-streamed one and holds two more in its engine's waiting queue, and while the
other replica streams a fifth.

Expected (server/ingress.py, "Replica death"):

* the stream that already sent tokens ends with exactly one in-band error event in the OpenAI error
  shape (503 ``replica_unavailable``), then ``data: [DONE]``, and no finish_reason before it;
* the two requests that had not produced a token yet are retried on a live replica, and so is the
  non-streamed one (its client had seen nothing yet); all three answer exactly what ``tierserve.LLM``
  answers offline (greedy, token-identical text: the app serves the reference's fp32 weights);
* the concurrent stream on the other replica completes unchanged.

The requests on the victim share its cached prefix, so the prefix router sends them there (its load
gap of 1-3 requests stays within the bound of 4); the fifth prompt has no full block, so it goes by
load to the idle replica. Every step waits on the metrics board or the prefix tree, not on time.
The app is this module's own (tests/failure_app.py), deleted at the end.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import requests
from failure_app import SSE, board_state, failure_app, replica_pids, running_replicas
from polling import wait_for

from tierserve import SamplingParams

APP = "ts-failures"
ROUTE = "/failures"
BLOCK_SIZE = 16  # the engine's default block size: the routing hashes below use it
#: Tokens of the non-streamed request: enough that it still runs when its replica is killed (the checks below
#: assert that it does, from the replica's running count, rather than assume it).
STARTED_TOKENS = 96


@pytest.fixture(scope="module")
def app(ray_session, smollm_folder):
    yield from failure_app(ray_session, APP, ROUTE, model=smollm_folder, replicas=2, max_num_seqs=2,
                           max_waiting_requests=2, max_model_len=2048)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def error_event_shape(event: dict) -> dict:
    assert set(event) == {"error"} and set(event["error"]) == {"message", "type", "param", "code"}, event
    return event["error"]


def test_killed_replica_ends_its_stream_in_band_and_its_waiting_requests_move(app, ray_session, smollm_llm):
    ray, _ = ray_session
    from tierserve.routing.serve_router import PREFIX_HASHES_KWARG, routing_kwargs
    from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name

    url = f"{app}/v1/completions"
    shared = "Minutes of the harbour committee, read aloud before the vote. " * 4
    waiting_prompts = [shared + "First item:", shared + "Second item:"]
    started_prompt = shared + "Third item:"
    other_prompt = "The three primary colors are"
    *refs, started_ref, other_ref = [o.text for o in smollm_llm.generate(  # one batch: the references
        [*waiting_prompts, started_prompt, other_prompt],
        [greedy(8), greedy(8), greedy(STARTED_TOKENS, ignore_eos=True), greedy(40, ignore_eos=True)])]
    wait_for(lambda: running_replicas(APP) == 2 and len(replica_pids(APP)) == 2,
             show=lambda: (running_replicas(APP), replica_pids(APP)))

    victim = SSE(url, {"prompt": shared + "The decision was", "max_tokens": 1500, "temperature": 0,
                       "ignore_eos": True})
    first = victim.next()
    assert victim.resp.status_code == 200 and "error" not in first, first
    busy = wait_for(lambda: [r for r, (run, _) in board_state(ray, APP).items() if run == 1],
                    show=lambda: board_state(ray, APP))
    assert len(busy) == 1
    (holder,) = busy
    # the waiting prompts' full blocks are the victim's: the holder must have reported them
    tree = ray.get_actor(tree_actor_name(APP, "LLMServer"), namespace=TREE_NAMESPACE)
    blocks = [routing_kwargs(smollm_llm.tokenizer.encode(p), BLOCK_SIZE)[PREFIX_HASHES_KWARG]
              for p in [*waiting_prompts, started_prompt]]
    shared_blocks = len(smollm_llm.tokenizer.encode(shared)) // BLOCK_SIZE - 1  # the last one may merge
    assert shared_blocks >= 2
    wait_for(lambda: all(ray.get(tree.longest_match.remote(b)).get(holder, 0) >= shared_blocks for b in blocks),
             show=lambda: [ray.get(tree.longest_match.remote(b)) for b in blocks])

    results: dict[str, list] = {}

    def stream(key: str, body: dict) -> None:
        s = SSE(url, body)
        results[key] = [s.resp.status_code, s.rest(), s.text()]

    def collect() -> None:
        r = requests.post(url, json={"prompt": started_prompt, "max_tokens": STARTED_TOKENS, "temperature": 0,
                                     "ignore_eos": True}, timeout=300)
        results["started"] = [r.status_code, r.json()]

    threads = [threading.Thread(target=collect)]
    threads[0].start()
    wait_for(lambda: board_state(ray, APP).get(holder) == (2, 0), show=lambda: board_state(ray, APP))
    threads += [threading.Thread(target=stream, args=(f"w{i}", {"prompt": p, "max_tokens": 8, "temperature": 0}))
                for i, p in enumerate(waiting_prompts)]
    for t in threads[1:]:
        t.start()
    wait_for(lambda: board_state(ray, APP).get(holder) == (2, 2), show=lambda: board_state(ray, APP))
    other = threading.Thread(target=stream, args=("other", {"prompt": other_prompt, "max_tokens": 40,
                                                            "temperature": 0, "ignore_eos": True}))
    other.start()
    others = wait_for(lambda: [r for r, (run, _) in board_state(ray, APP).items() if r != holder and run == 1],
                      show=lambda: board_state(ray, APP))
    assert board_state(ray, APP)[holder] == (2, 2), (holder, others)  # nothing finished on the victim meanwhile

    os.kill(replica_pids(APP)[holder], signal.SIGKILL)
    events = victim.rest()
    for t in [*threads, other]:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in [*threads, other])

    # the victim: tokens, then exactly one error event, then [DONE]; it never finished
    assert events[-1] == "[DONE]" and isinstance(events[-2], dict)
    err = error_event_shape(events[-2])
    assert (err["type"], err["code"], err["param"]) == ("service_unavailable_error", "replica_unavailable", None)
    chunks = events[:-2]
    assert chunks and all("error" not in c and c["choices"][0].get("finish_reason") is None for c in chunks)
    # the requests that had not started moved and answer exactly the offline reference
    for i, ref in enumerate(refs):
        status, evs, text = results[f"w{i}"]
        assert status == 200 and evs[-1] == "[DONE]", evs
        assert not [e for e in evs if isinstance(e, dict) and "error" in e], evs
        assert text == ref
    status, body = results["started"]
    assert status == 200 and body["choices"][0]["text"] == started_ref, body
    status, evs, text = results["other"]
    assert status == 200 and evs[-1] == "[DONE]" and text == other_ref


def test_replicas_resend_their_cache_to_a_recreated_tree(app, ray_session, smollm_llm):
    """The prefix tree actor is killed: the next report of each replica that serves a request fails,
    and the replica looks the tree up again (recreated by name) and re-sends its *whole* device cache
    (server/worker.py ``_reconnect_tree``), so blocks cached before the kill are routable again. Two
    overlapping streams put one request on each replica (by load: the router's own lookups fail too)."""
    ray, _ = ray_session
    from tierserve.routing.serve_router import PREFIX_HASHES_KWARG, routing_kwargs
    from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name

    url = f"{app}/v1/completions"
    wait_for(lambda: running_replicas(APP) == 2, timeout_s=120, show=lambda: running_replicas(APP))
    name = tree_actor_name(APP, "LLMServer")
    prompt = "An inventory of the lighthouse stores, shelf by shelf, taken in the spring. " * 3
    ids = smollm_llm.tokenizer.encode(prompt)
    hashes = routing_kwargs(ids, BLOCK_SIZE)[PREFIX_HASHES_KWARG]
    full = (len(ids) - 1) // BLOCK_SIZE                      # blocks the prefill caches (the last token is not)
    assert requests.post(url, json={"prompt": prompt, "max_tokens": 2}, timeout=120).status_code == 200
    tree = ray.get_actor(name, namespace=TREE_NAMESPACE)
    held = wait_for(lambda: {r: m for r, m in ray.get(tree.longest_match.remote(hashes)).items() if m == full},
                    show=lambda: ray.get(tree.longest_match.remote(hashes)))
    ray.kill(tree, no_restart=True)

    first = SSE(url, {"prompt": "Count: one, two,", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert "error" not in first.next()
    second = SSE(url, {"prompt": "Colours: red, green,", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert "error" not in second.next()
    for s in (first, second):
        assert s.rest()[-1] == "[DONE]"

    def successor_holds():
        try:
            successor = ray.get_actor(name, namespace=TREE_NAMESPACE)
        except ValueError:
            return None
        return ray.get(successor.longest_match.remote(hashes)) == held

    wait_for(successor_holds, timeout_s=60)


def test_metrics_survive_a_killed_board(app, ray_session):
    """The app's metrics board actor is killed: /metrics keeps answering 200, and once each replica pushed
    again (every 0.25 s) it shows both replicas and counters no smaller than before (snapshots are
    cumulative), because the ingress and the replicas look the board up again (recreated by name)."""
    ray, _ = ray_session
    from prometheus_client.parser import text_string_to_metric_families

    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    def scrape() -> dict[str, float] | None:
        resp = requests.get(f"{app}/metrics", timeout=30)
        if resp.status_code != 200:
            return None
        return {s.name: s.value for fam in text_string_to_metric_families(resp.text) for s in fam.samples
                if s.labels.get("model_name") == APP}

    wait_for(lambda: running_replicas(APP) == 2, timeout_s=120, show=lambda: running_replicas(APP))
    live = set(wait_for(lambda: len(p := replica_pids(APP)) == 2 and p))
    assert requests.post(f"{app}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True},
                         timeout=120).status_code == 200
    board = ray.get_actor(metrics_board_name(APP), namespace=BOARD_NAMESPACE)

    def live_tokens() -> int:
        # a replica killed earlier may still have a fresh snapshot on the old board: count the live ones only
        snaps = ray.get(board.collect.remote())
        return live <= set(snaps) and sum(snaps[r].generation_tokens for r in live)

    before = wait_for(lambda: (n := live_tokens()) >= 2 and n)
    ray.kill(board, no_restart=True)
    after = wait_for(lambda: (m := scrape()) and m.get("tierserve:num_replicas") == 2 and m, show=scrape)
    assert after.get("tierserve:generation_tokens_total", 0) >= before > 0
