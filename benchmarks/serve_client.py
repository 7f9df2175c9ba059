"""The client side of benchmarks/serve.py (its docstring has the workload and what is measured): the
conversations driven through the ``openai`` client, one record per request, and the prefix-cache counters
read from the server's /metrics."""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request
from dataclasses import dataclass, field

from serve_workload import Conversation


@dataclass
class RequestRecord:
    conversation: int
    turn: int
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class RunResult:
    router: str
    wall_s: float
    records: list[RequestRecord] = field(default_factory=list)
    metrics_queries: float = 0.0
    metrics_hits: float = 0.0
    requests_per_replica: list[int] = field(default_factory=list)


# ------------------------------------------------------------------ client
async def one_turn(client, model: str, messages: list[dict], max_tokens: int) -> tuple[str, RequestRecord]:
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    e2e = time.perf_counter() - t0
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None and details.cached_tokens else 0
    rec = RequestRecord(-1, -1, ttft if ttft is not None else e2e, e2e, usage.prompt_tokens, cached,
                        usage.completion_tokens)
    return "".join(text), rec


async def run_conversation(client, model: str, idx: int, conv: Conversation, max_tokens: int,
                           gate: asyncio.Semaphore, records: list[RequestRecord]) -> None:
    messages = [{"role": "system", "content": conv.system}]
    for turn, question in enumerate(conv.questions):
        if turn:
            await asyncio.sleep(conv.think_s[turn - 1])
        messages.append({"role": "user", "content": question})
        async with gate:
            reply, rec = await one_turn(client, model, messages, max_tokens)
        rec.conversation, rec.turn = idx, turn
        records.append(rec)
        messages.append({"role": "assistant", "content": reply})


async def warm_up(client, model: str, n: int) -> None:
    await asyncio.gather(*(one_turn(client, model, [{"role": "user", "content": f"Say hello number {i}."}], 4)
                           for i in range(n)))


async def measure(client, model: str, workload: list[Conversation], args) -> tuple[float, list[RequestRecord]]:
    """The whole workload; returns (wall seconds, records)."""
    order = list(range(len(workload)))
    random.Random(args.seed).shuffle(order)
    gate = asyncio.Semaphore(args.concurrency)
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(run_conversation(client, model, i, workload[i], args.max_tokens, gate, records)
                           for i in order))
    return time.perf_counter() - t0, records


def prefix_counters(base_url: str) -> tuple[float, float]:
    """(queries, hits) prefix-cache token counters summed over replicas, from /metrics."""
    body = urllib.request.urlopen(f"{base_url}/metrics", timeout=30).read().decode()
    values = {}
    for name in ("queries", "hits"):
        m = re.search(rf"^tierserve:prefix_cache_{name}_total\{{[^}}]*\}} (\S+)$", body, re.M)
        values[name] = float(m.group(1)) if m else 0.0
    return values["queries"], values["hits"]
