"""Worker admission (server/admission.py): a full replica refuses a fresh request at once but serves, in
order, the requests that queued in Serve while it could take none.

Pure asyncio: the gate's rules with exact counts (admit, immediate refusal, FIFO hand-over, timeout,
cancellation without a leaked slot), then Serve's dispatch as the gate meets it after a replica comes back:
a queue of 12 requests, at most capacity + 1 = 4 in flight at the replica (Serve's max_ongoing_requests),
each refusal returning at once and freeing its slot. Without the queued rule (every request fresh) 8 of
the 12 get 429 -- the fault this fixes; with it all 12 are served, first come first served.
Live: the strict app's real LLMServer replica (2 running + 1 waiting), held full by three long streams,
refuses a fresh call with QueueFullError at once and admits a call sent 5 s earlier as soon as one slot
frees.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import requests
from polling import wait_for

from tierserve.server.admission import AdmissionGate


def run(coro):
    return asyncio.run(coro)


def test_free_slots_admit_and_a_fresh_overflow_is_refused_at_once():
    async def go():
        gate = AdmissionGate(2, queued_after_s=0.5, max_wait_s=5)
        assert await gate.enter(0.0) and await gate.enter(9.0) and gate.active == 2
        # "at once" without a clock: the refusal finishes in the coroutine's first step, never suspending
        refusal = gate.enter(0.1)
        with pytest.raises(StopIteration) as done:
            refusal.send(None)
        assert done.value.value is False and gate.active == 2 and gate.waiting == 0
        gate.leave()
        assert gate.active == 1
    run(go())


def test_queued_requests_wait_and_take_freed_slots_in_order():
    async def go():
        gate = AdmissionGate(1, queued_after_s=0.5, max_wait_s=5)
        assert await gate.enter(0.0)
        order = []

        async def queued(i):
            assert await gate.enter(2.0)
            order.append(i)
        tasks = [asyncio.create_task(queued(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert gate.waiting == 3 and order == []
        assert not await gate.enter(0.0)        # a fresh one does not jump the queue, nor wait
        for expect in ([0], [0, 1], [0, 1, 2]):
            gate.leave()                         # the running one finishes: its slot goes to the first waiter
            await asyncio.sleep(0.01)
            assert order == expect and gate.active == 1
        await asyncio.gather(*tasks)
        gate.leave()
        assert gate.active == 0 and gate.waiting == 0
    run(go())


def test_a_queued_request_times_out_and_a_cancelled_one_leaks_no_slot():
    async def go():
        gate = AdmissionGate(1, queued_after_s=0.5, max_wait_s=0.05)
        assert await gate.enter(0.0)
        assert not await gate.enter(1.0)         # waited max_wait_s, then the 429
        assert gate.waiting == 0 and gate.active == 1
        gate.max_wait_s = 5
        waiter = asyncio.create_task(gate.enter(1.0))
        await asyncio.sleep(0.01)
        waiter.cancel()                          # its client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.leave()
        assert gate.active == 0 and gate.waiting == 0
        assert await gate.enter(0.0) and gate.active == 1
    run(go())


async def serve_dispatch(gate: AdmissionGate, n: int, waited_s: float, service_s: float) -> tuple[int, int]:
    """Serve's router over one replica: at most capacity + 1 calls in flight, the next queued call sent as soon
    as one returns (a 429 returns at once). Returns (served, refused)."""
    in_flight = asyncio.Semaphore(gate.capacity + 1)
    served = refused = 0

    async def call():
        nonlocal served, refused
        async with in_flight:
            if not await gate.enter(waited_s):
                refused += 1
                return
            try:
                await asyncio.sleep(service_s)
                served += 1
            finally:
                gate.leave()
    await asyncio.gather(*(call() for _ in range(n)))
    return served, refused


def test_a_queue_built_while_the_replica_was_down_drains_in_order_not_as_429s():
    # fresh calls (the old worker): capacity served, every other one refused at once
    assert run(serve_dispatch(AdmissionGate(3), 12, waited_s=0.0, service_s=0.02)) == (3, 9)
    # the same queue, whose calls waited in Serve while no replica was up: all served
    assert run(serve_dispatch(AdmissionGate(3), 12, waited_s=20.0, service_s=0.02)) == (12, 0)


@pytest.fixture(scope="module")
def servers(tierserve_servers):
    return tierserve_servers


def test_the_live_worker_refuses_a_fresh_call_and_admits_a_queued_one(servers):
    from ray import serve
    from ray_fixtures import STRICT_APP, STRICT_KEY

    from tierserve.sampling_params import SamplingParams
    from tierserve.server.errors import unwrap

    worker = serve.get_deployment_handle("LLMServer", app_name=STRICT_APP)
    url = f"{servers.strict}/v1/completions"
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    long_body = {"prompt": "Go on:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    stops = [threading.Event() for _ in range(3)]
    streaming: list[int] = []  # holders whose stream started (the 2 running; the waiting one has no event yet)

    def hold(i):
        with requests.post(url, json=long_body, headers=headers, stream=True, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            streaming.append(i)
            stops[i].wait()

    holders = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    params = SamplingParams(max_tokens=2, temperature=0)
    try:
        for t in holders:
            t.start()
        wait_for(lambda: worker.stats.remote().result().active == 3 and len(streaming) == 2,
                 show=lambda: (worker.stats.remote().result(), streaming))
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:       # fresh: refused at once
            list(worker.options(stream=True).generate.remote([1, 2, 3], params, "fresh", sent_at=time.time()))
        err = unwrap(e.value)
        assert (err.status, err.code) == (429, "queue_full") and time.monotonic() - t0 < 10, repr(e.value)
        queued = worker.options(stream=True).generate.remote([1, 2, 3], params, "queued", sent_at=time.time() - 5)
        outs = []
        reader = threading.Thread(target=lambda: outs.extend(queued))
        reader.start()
        time.sleep(2)
        assert not outs and reader.is_alive()     # waits while the replica is full
        # A running stream's client leaves: its worker slot goes to the queued call (the engine's waiting
        # holder takes the freed running row and starts streaming); once that holder leaves as well, the
        # queued call runs and finishes. (Freeing the waiting holder first would free nothing: it has no
        # response to close before it runs.)
        stops[streaming[0]].set()
        wait_for(lambda: len(streaming) == 3, show=lambda: (worker.stats.remote().result(), streaming, outs))
        assert not outs
        stops[streaming[2]].set()
        reader.join(timeout=120)
        assert outs and outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 2
    finally:
        for s in stops:
            s.set()
        for t in holders:
            t.join(timeout=60)
    wait_for(lambda: worker.stats.remote().result().active == 0, show=lambda: worker.stats.remote().result())
