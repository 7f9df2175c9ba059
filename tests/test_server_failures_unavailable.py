"""The 500 and 503 answers of a live server, provoked for real on a one-replica app of this module.

* 500: the replica's engine is closed (``LLMServer.close`` through its Serve handle) while one request
  streams and another waits. The stream, whose status line is already sent, ends with one in-band
  error event (``server_error`` / ``internal_error`` naming the RuntimeError) and ``data: [DONE]``;
  the waiting non-streamed request gets HTTP 500 with the OpenAI error body. A closed replica fails
  Serve's health check (server/worker.py ``check_health``).
* 503: the replica's process is killed. While Serve restarts it, requests wait in the ingress's
  handle queue, which holds ``max_queued_requests = 4 * (max_num_seqs + max_waiting_requests) = 8``
  (server/app.py); the 9th gets 503 ``overloaded`` with ``Retry-After`` at once, in the OpenAI error
  body (not Serve's plain-text backpressure page). The 8 that waited all get an answer from the
  restarted replica: what ``tierserve.LLM`` answers offline, or 429 where its queue is full.
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

APP = "ts-unavailable"
ROUTE = "/unavailable"
RETRY_AFTER_S = 3          # failure_app.BASE_ARGS
QUEUE = 4 * (1 + 1)        # max_queued_requests of the worker handle: 4 * (max_num_seqs + max_waiting_requests)


@pytest.fixture(scope="module")
def app(ray_session, smollm_folder):
    yield from failure_app(ray_session, APP, ROUTE, model=smollm_folder, replicas=1, max_waiting_requests=1,
                           max_model_len=2048)


def error_body(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers.get("content-type") == "application/json", (resp.headers, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_closed_engine_is_500_in_band_and_over_http(app, ray_session):
    ray, _ = ray_session
    from ray import serve

    url = f"{app}/v1/completions"
    wait_for(lambda: running_replicas(APP) == 1)
    stream = SSE(url, {"prompt": "Tell me a very long story.", "max_tokens": 1500, "temperature": 0,
                       "ignore_eos": True})
    assert stream.resp.status_code == 200 and "error" not in stream.next()
    waiting: dict = {}
    t = threading.Thread(target=lambda: waiting.setdefault(
        "resp", requests.post(url, json={"prompt": "Hi", "max_tokens": 4}, timeout=120)))
    t.start()
    wait_for(lambda: list(board_state(ray, APP).values()) == [(1, 1)], show=lambda: board_state(ray, APP))

    serve.get_deployment_handle("LLMServer", app_name=APP).close.remote().result(timeout_s=120)
    events = stream.rest()
    t.join(timeout=120)
    assert events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert errors == [events[-2]], events                     # one error event, the last before [DONE]
    err = errors[0]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == ("server_error", "internal_error", None)
    assert err["message"] == "internal error: RuntimeError: AsyncLLMEngine is closed"
    err = error_body(waiting["resp"], 500)
    assert (err["type"], err["code"], err["message"]) == (
        "server_error", "internal_error", "internal error: RuntimeError: AsyncLLMEngine is closed")


def test_no_live_replica_queues_then_answers_503_with_retry_after(app, smollm_llm):
    from ray import serve

    url = f"{app}/v1/completions"
    ingress = serve.get_deployment_handle("OpenAIIngress", app_name=APP)
    prompts = [f"Fact number {i}: the number {i * 7} is" for i in range(QUEUE)]
    refs = [o.text for o in smollm_llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))]
    wait_for(lambda: replica_pids(APP), timeout_s=120)
    for pid in replica_pids(APP).values():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: running_replicas(APP) == 0, show=lambda: serve.status().applications.get(APP))

    answers: dict[int, requests.Response] = {}

    def ask(i: int) -> None:
        answers[i] = requests.post(url, json={"prompt": prompts[i], "max_tokens": 4, "temperature": 0},
                                   timeout=300)

    threads = []
    for i in range(QUEUE):  # one at a time: each is admitted by the ingress before the next is sent
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        wait_for(lambda n=i + 1: ingress.in_flight.remote().result() == n,
                 show=lambda: (ingress.in_flight.remote().result(), answers))
    assert running_replicas(APP) == 0 and not answers   # still no replica: all 8 wait in the handle queue
    over = requests.post(url, json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
    err = error_body(over, 503)
    assert (err["type"], err["code"], err["param"]) == ("service_unavailable_error", "overloaded", None)
    assert over.headers["Retry-After"] == str(RETRY_AFTER_S)
    assert f"max_queued_requests={QUEUE}" in err["message"]
    for t in threads:
        t.join(timeout=300)
    # Nothing is lost: once the replica is back every queued request is served. Serve sends it up to
    # max_ongoing_requests = capacity + 1 = 3 of them at once; the one beyond the engine's capacity of 2 has
    # waited in Serve's queue (longer than the admission grace), so it waits for a slot at the replica
    # instead of getting 429 (server/admission.py): all 8 get the offline reference's text.
    statuses = [answers[i].status_code for i in range(QUEUE)]
    assert statuses == [200] * QUEUE, [(a.status_code, a.text[:200]) for a in answers.values()]
    for i in range(QUEUE):
        assert answers[i].json()["choices"][0]["text"] == refs[i]
