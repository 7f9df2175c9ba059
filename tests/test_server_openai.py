"""The OpenAI-compatible server, live: the official ``openai`` client against a local Ray Serve app.

Reference: ``tierserve.LLM`` on the same SmolLM2 folder (conftest ``smollm_llm``), run in this
process. Greedy requests must be token-identical to it (compared through the
``return_token_ids`` extension and the text). The apps come from tests/ray_fixtures.py:
``main`` has 2 worker replicas (16 running + 48 waiting each), ``strict`` has 1 replica with
chunked prefill (64 tokens per request per step).
"""

from __future__ import annotations

import json
import threading

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from polling import wait_for
from ray_fixtures import MAIN_APP, STRICT_KEY

from tierserve import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def scrape(base: str) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(values: dict, name: str, model: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": model, **labels}.items())))
    return values.get(key, 0.0)


def sse_events(resp):
    """Yield the parsed data (or '[DONE]') of each SSE event of a streaming response."""
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            data = line[len(b"data: "):].decode()
            yield data if data == "[DONE]" else json.loads(data)


@pytest.fixture(scope="module")
def servers(tierserve_servers):
    return tierserve_servers


@pytest.fixture(scope="module")
def model_name(servers):
    return client(servers.main).models.list().data[0].id


def test_models_endpoint(servers):
    from tierserve.engine.model_source import DEFAULT_MODEL_NAME

    models = client(servers.main).models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL_NAME]       # the default model's served name
    assert requests.get(f"{servers.main}/health", timeout=10).status_code == 200


def test_completions_greedy_match_llm_generate(servers, smollm_llm, model_name):
    refs = smollm_llm.generate(PROMPTS, greedy(12, logprobs=1))
    c = client(servers.main)
    for prompt, ref in zip(PROMPTS, refs):
        r = c.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0,
                                 logprobs=1, extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.text == ref.text
        assert choice.model_extra["token_ids"] == ref.token_ids
        assert r.model_extra["prompt_token_ids"] == ref.prompt_token_ids
        assert choice.finish_reason == ref.finish_reason == "length"
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
        # logprobs: the sampled token's logprob matches the reference's, and it is the top-1.
        assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-4)
        assert "".join(choice.logprobs.tokens) == ref.text


def test_completion_prompt_as_token_ids(servers, smollm_llm, model_name):
    ids = smollm_llm.tokenizer.encode(PROMPTS[0])
    ref = smollm_llm.generate(ids, greedy(8))[0]
    r = client(servers.main).completions.create(model=model_name, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.text


def test_chat_greedy_matches_llm_generate(servers, smollm_llm, model_name):
    question = "What is the tallest mountain on Earth?"
    ref = smollm_llm.generate(chat_ids(smollm_llm.tokenizer, question), greedy(20))[0]
    r = client(servers.main).chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0,
        extra_body={"return_token_ids": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].model_extra["token_ids"] == ref.token_ids
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)


def test_chat_stop_and_seed(servers, smollm_llm, model_name):
    question = "List three fruits."
    ids = chat_ids(smollm_llm.tokenizer, question)
    c = client(servers.main)
    ref = smollm_llm.generate(ids, greedy(30, stop=(",",)))[0]
    r = c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                  max_tokens=30, temperature=0, stop=[","])
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
    # Seeded sampling is reproducible and equals the offline engine with the same seed.
    kw = dict(max_tokens=10, temperature=0.9, seed=1234)
    ref = smollm_llm.generate(ids, SamplingParams(top_k=40, **kw))[0]
    outs = [c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question}],
                                      extra_body={"top_k": 40}, **kw).choices[0].message.content
            for _ in range(2)]
    assert outs == [ref.text, ref.text]


def test_streaming_is_incremental_and_matches(servers, smollm_llm, model_name):
    question = "Write a short poem about the sea."
    ref = smollm_llm.generate(chat_ids(smollm_llm.tokenizer, question), greedy(40, ignore_eos=True))[0]
    body = {"model": model_name, "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{servers.main}/v1/chat/completions", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [e for e in chunks if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in content) == ref.text
    assert len(content) >= 20                                  # token by token, not one blob
    # (that events reach the client while the request still runs, whatever the machine's speed, is
    # test_client_disconnect_frees_sequence: 3 events read, the request still counted running)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 40
    assert usage["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert [e["choices"][0].get("finish_reason") for e in chunks[:-1]][-1] == "length"

    # The openai client parses the same stream.
    stream = client(servers.main).completions.create(
        model=model_name, prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})
    parts = list(stream)
    ref = smollm_llm.generate(PROMPTS[2], greedy(10))[0]
    assert "".join(p.choices[0].text for p in parts if p.choices) == ref.text
    assert parts[-1].usage.completion_tokens == 10 and not parts[-1].choices


def test_32_concurrent_streams_over_two_replicas(servers, smollm_llm, model_name, ray_session):
    ray, _ = ray_session
    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    board = ray.get_actor(metrics_board_name(MAIN_APP), namespace=BOARD_NAMESPACE)
    before = {r: s.generation_tokens for r, s in ray.get(board.collect.remote()).items()}
    prompts = [f"Fact number {i}: the number {i * 7} is" for i in range(32)]
    refs = smollm_llm.generate(prompts, greedy(16))
    got: dict[int, str] = {}
    errors: list[BaseException] = []
    c = client(servers.main)

    def run(i: int) -> None:
        try:
            stream = c.completions.create(model=model_name, prompt=prompts[i], max_tokens=16, temperature=0,
                                          stream=True)
            got[i] = "".join(p.choices[0].text for p in stream if p.choices)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors[:3]
    assert [got[i] for i in range(32)] == [r.text for r in refs]
    # Both replicas generated tokens for this batch (their pushed metrics grew), together every token of it
    # (most answers end at eos before 16 tokens).
    want = sum(len(r.token_ids) for r in refs)

    def grown():
        after = {r: s.generation_tokens for r, s in ray.get(board.collect.remote()).items()}
        total = sum(after[r] - before.get(r, 0) for r in after)
        return after if total >= want else None

    after = wait_for(grown, show=lambda: (before, ray.get(board.collect.remote())))
    grew = [r for r in after if after[r] > before.get(r, 0)]
    assert len(grew) == 2, (before, after)


def _running_by_replica(ray, board) -> dict[str, int]:
    return {r: snap.running for r, snap in ray.get(board.collect.remote()).items()}


def test_prefix_routing_reuses_cache(servers, smollm_llm, model_name, ray_session):
    """The request follows its prefix where load alone would send it elsewhere.

    A unique long prompt P is served once; the replica H that served it reports P's blocks to the prefix
    tree (polled there). A long stream sharing P's prefix then keeps H busy (1 request against 0 on the
    other replica), so load alone, and the tie-break between equal loads, point to the other replica,
    which has never seen P. P again goes to H by its prefix: every whole block of it comes from cache."""
    ray, _ = ray_session
    from tierserve.routing.serve_router import PREFIX_HASHES_KWARG, routing_kwargs
    from tierserve.routing.tree_actor import TREE_NAMESPACE, tree_actor_name
    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    tree = ray.get_actor(tree_actor_name(MAIN_APP, "LLMServer"), namespace=TREE_NAMESPACE)
    board = ray.get_actor(metrics_board_name(MAIN_APP), namespace=BOARD_NAMESPACE)
    prompt = "Summary of the meeting notes. " * 12 + "The decision was"
    ids = smollm_llm.tokenizer.encode(prompt)
    n = len(ids)
    hashes = routing_kwargs(ids, 16)[PREFIX_HASHES_KWARG]
    wait_for(lambda: not any(_running_by_replica(ray, board).values()),  # earlier tests' requests are done
             show=lambda: _running_by_replica(ray, board))
    c = client(servers.main)
    first = c.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0)

    def holders():
        matches = ray.get(tree.longest_match.remote(hashes))
        return {r: m for r, m in matches.items() if m > 0}

    held = wait_for(holders, show=lambda: ray.get(tree.longest_match.remote(hashes)))
    assert len(held) == 1 and list(held.values()) == [(n - 1) // 16], held
    (holder,) = held
    body = {"model": model_name, "prompt": prompt + " postponed, and the chair", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    busy = requests.post(f"{servers.main}/v1/completions", json=body, stream=True, timeout=120)
    try:
        busy_events = sse_events(busy)
        event = next(busy_events)
        assert busy.status_code == 200 and "error" not in event, event  # the stream runs (no in-band error)
        loads = wait_for(lambda: (r := _running_by_replica(ray, board)).get(holder, 0) >= 1 and r,
                         show=lambda: (_running_by_replica(ray, board), [next(busy_events, None) for _ in range(3)]))
        assert sum(loads.values()) == 1 and len(loads) == 2, (holder, loads)  # the other replica is idle
        second = c.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0)
    finally:
        busy.close()
    assert second.choices[0].text == first.choices[0].text
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0


def settled_scrape(base: str, model: str) -> dict:
    """/metrics once no request runs or waits and the token and request counters are unchanged between two
    scrapes taken more than two push intervals (2 x 0.25 s) apart: earlier requests' counts have landed."""
    names = ("tierserve:generation_tokens_total", "tierserve:prompt_tokens_total",
             "tierserve:e2e_request_latency_seconds_count", "tierserve:num_requests_running",
             "tierserve:num_requests_waiting")
    last = [None]

    def settled():
        now = scrape(base)
        key = tuple(metric(now, k, model) for k in names)
        done = key == last[0] and key[3] == key[4] == 0
        last[0] = key
        return now if done else None

    return wait_for(settled, interval_s=0.6)


def test_metrics_count_tokens_and_cache(servers, model_name):
    before = settled_scrape(servers.main, model_name)
    c = client(servers.main)
    r = c.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=7, temperature=0)
    prompt_tokens = r.usage.prompt_tokens

    def updated():
        now = scrape(servers.main)
        d = metric(now, "tierserve:generation_tokens_total", model_name) - \
            metric(before, "tierserve:generation_tokens_total", model_name)
        return now if d >= 7 else None

    now = wait_for(updated)
    delta = {k: metric(now, k, model_name) - metric(before, k, model_name) for k in (
        "tierserve:generation_tokens_total", "tierserve:prompt_tokens_total",
        "tierserve:e2e_request_latency_seconds_count", "tierserve:time_to_first_token_seconds_count",
        "tierserve:inter_token_latency_seconds_count", "tierserve:prefix_cache_queries_total")}
    assert delta["tierserve:generation_tokens_total"] == 7
    assert delta["tierserve:prompt_tokens_total"] == prompt_tokens
    assert delta["tierserve:e2e_request_latency_seconds_count"] == 1
    assert delta["tierserve:time_to_first_token_seconds_count"] == 1
    assert delta["tierserve:inter_token_latency_seconds_count"] == 6
    assert delta["tierserve:prefix_cache_queries_total"] >= prompt_tokens
    assert metric(now, "tierserve:num_replicas", model_name) == 2
    assert metric(now, "tierserve:request_success_total", model_name, finished_reason="length") >= 1


def test_client_disconnect_frees_sequence(servers, model_name):
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    resp = requests.post(f"{servers.main}/v1/completions", json=body, stream=True, timeout=120)
    events = sse_events(resp)
    for _ in range(3):
        next(events)
    running = wait_for(lambda: (v := metric(scrape(servers.main), "tierserve:num_requests_running",
                                            model_name)) >= 1 and v)
    assert running == 1
    assert metric(scrape(servers.main), "tierserve:kv_cache_usage_perc", model_name) > 0
    resp.close()                                                # the client goes away mid-stream

    def freed():
        m = scrape(servers.main)
        return (metric(m, "tierserve:num_requests_running", model_name) == 0
                and metric(m, "tierserve:kv_cache_usage_perc", model_name) == 0
                and metric(m, "tierserve:request_success_total", model_name, finished_reason="abort") >= 1)

    wait_for(freed, timeout_s=20)


def test_tokens_keep_flowing_during_a_long_prefill(servers, smollm_llm):
    """Stream A decodes while B's 1500-token prompt is prefilled in 64-token chunks on the same replica.

    Counted in tokens and in the order events reach the client, never in time: the events of both streams
    go into one log under a lock, with a mark when B is sent and when B's first token arrives. B's prefill
    takes ceil(1500 / 64) = 24 engine steps (strict: ``long_prefill_token_threshold=64``, 2 sequences
    running: A and B), and each of those steps also decodes one token of A, so A gains 24 tokens between B's
    admission and B's first token (the last of them in the same step as B's token, so it may arrive after
    it: 23). Without chunked prefill B's whole prompt is one step and A gains at most 1 token (plus the ones
    already on their way when B was sent). The bound asserted, at least half of the 24, separates the two
    while leaving room for A's events that B's first event overtakes between the engine and the client."""
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    steps = -(-1500 // 64)
    a_body = {"prompt": "Count: one, two, three,", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
              "stream": True, "return_token_ids": True}
    long_ids = (smollm_llm.tokenizer.encode("The history of the world is long. ") * 200)[:1500]
    log: list[tuple[str, int]] = []      # ("a", tokens in the event) / ("b sent", 0) / ("b first", 0)
    lock = threading.Lock()

    def note(kind: str, n: int = 0) -> None:
        with lock:
            log.append((kind, n))

    with requests.post(f"{servers.strict}/v1/completions", json=a_body, stream=True, headers=headers,
                       timeout=120) as resp_a:
        events = sse_events(resp_a)
        for _ in range(3):
            next(events)

        def run_b():
            b_body = {"prompt": long_ids, "max_tokens": 1, "temperature": 0, "stream": True}
            note("b sent")
            with requests.post(f"{servers.strict}/v1/completions", json=b_body, stream=True, headers=headers,
                               timeout=120) as resp_b:
                for e in sse_events(resp_b):
                    if e != "[DONE]" and e["choices"] and not any(k == "b first" for k, _ in log):
                        note("b first")

        tb = threading.Thread(target=run_b)
        tb.start()
        while tb.is_alive():
            e = next(events)
            assert e != "[DONE]", "A ended before B's first token"
            note("a", len(e["choices"][0].get("token_ids", [])) if e["choices"] else 0)
        tb.join()
    kinds = [k for k, _ in log]
    assert kinds.count("b sent") == kinds.count("b first") == 1, kinds
    sent, first = kinds.index("b sent"), kinds.index("b first")
    during = sum(n for k, n in log[sent:first] if k == "a")
    assert during >= steps // 2, (during, steps, log)
