"""Prefix-aware routing vs Ray Serve's power-of-two router on a multi-turn chat workload.

The workload itself is in benchmarks/serve_workload.py, its client (conversations through the openai client,
per-request records) in serve_client.py. One process starts a local Ray (dashboard off, 150 MB object store, as
tests/ray_fixtures.py does) and Serve on a free port, then runs the tierserve
app (``tierserve.server.app:build_app``) with LLMServer replicas of the
default SmolLM2-135M model, once per router at every point of a sweep over
``--replicas`` (default 2,3,4), ``--share`` (conversations per system prompt:
1, 2, 4), ``--seeds`` (0,1,2: questions, think times, start order) and
per-replica KV cache sizes (default: 0.45 of each sharing's working set, below):

* ``prefix``: ``PrefixAwareRequestRouter`` (longest cached prefix, bounded by load);
* ``cost``: Router v2, the same router class with ``CostAwarePolicy`` (routing/policy.py: the
  prefill tokens a replica would still compute plus its queued prefill and decode load, over its capacity);
* ``pow2``: Ray Serve's default ``PowerOfTwoChoicesRequestRouter``.

Each run deploys a fresh app (new replicas, empty caches, new prefix-tree and
metrics actors) and tears it down afterwards. Both runs send the same workload:

* ``--conversations`` conversations (default 16) over ``conversations /
  share`` long system prompts (share 1: one per conversation; more makes users
  of one assistant share its prompt: conversation i uses prompt ``i mod n``). A
  prompt is an instruction plus a passage of a Jane Austen novel
  (``tierserve.data.austen``; novel ``j mod 6``), ``--passage-chars``
  characters (~700-900 SmolLM2 tokens, ~55 blocks). Each conversation asks
  its own seeded questions;
* ``--turns`` turns each; turn t sends the whole history (system, the earlier
  user questions and the assistant's replies) plus a new question, through the
  ``openai`` client, streaming, ``max_tokens=--max-tokens``, temperature 0,
  ``stream_options.include_usage``;
* all conversations are live at once and their turns interleave: at most
  ``--concurrency`` requests are in flight; between two turns the user thinks
  for a seeded exponential time with mean ``--think-s`` (default 2 s; the same
  times for every router). The order in which conversations start is a seeded
  shuffle (``--seed``).

Think time matters for the baseline. Without it (``--think-s 0``) a turn is
sent the instant the previous reply ends, when the replica that served it has
just lost a running request, so power-of-two's shorter-queue choice follows
the conversation: an artefact of a closed loop with no users, which made the
baseline look prefix-aware (hit rates 0.59-0.85 in such runs). With think
time, other users' requests reorder the queues in between, as in a real
service.

Before measuring, ``--warmup`` short unrelated requests run concurrently
(first-call costs); they are excluded from every number.

Measured per request: TTFT (request sent -> first streamed chunk with
content), end-to-end latency, prompt / cached / completion tokens (the usage
chunk: ``prompt_tokens_details.cached_tokens``). Per run: prefix-cache hit rate
= sum(cached tokens) / sum(prompt tokens) over the measured requests, checked
against the deltas of ``tierserve:prefix_cache_hits_total`` /
``tierserve:prefix_cache_queries_total`` on /metrics; TTFT p50/p95 (nearest
rank); throughput = completion tokens / wall time and requests / wall time of
the measured phase. Ratios: hit rate prefix/pow2, p50 and p95 TTFT pow2/prefix,
throughput prefix/pow2, and their means over the seeds per setting with the
targets of the issue (benchmarks/serve_report.py): p95 TTFT within 10% of
power-of-two's, p50 TTFT >= 2x better, hit rate >= 1.4x.

KV cache size: ``--cache-fraction F`` (default 0.45) sizes each replica's
cache per sharing: ``F`` times the
working set (serve_workload.working_set_blocks: every distinct system prompt
once plus every conversation's questions, template tokens and ``--max-tokens``
per reply, in blocks; the largest over the seeds, so all seeds of a setting
share one size). ``--num-blocks`` (a comma list of sizes in blocks of 16
tokens, each run with every router on fresh replicas) fixes the size instead.
With the default workload the working set is 988 blocks at share 1, 573 at
share 2 and 370 at share 4 over seeds 0-2 (0.45 of them: 446, 260, 168
blocks), so a fixed 640 blocks is 0.65 of it at share 1 but more than all of
it with shared prompts: there every replica soon holds every prompt, whichever
router sent the requests, and no router can raise the hit rate much (see
"Why the default is under pressure" below). The regimes below were measured
with two replicas over 448,640,2048 blocks and one prompt per conversation.
The working set is ~16 x 65 = ~1040 blocks (prompts plus histories). The prefix router keeps each conversation on one
replica, which then needs about half of it; power-of-two sends every
conversation to both. 448 blocks hold a little less than one half (heavy
pressure), 640 one half but not the whole (moderate pressure), 2048
everything.

What bounds the hit-rate ratio with two replicas. Every conversation's first
turn is cold under both routers (with one prompt per conversation), so the
prefix router's hit rate is at most (turns - 1) / turns of the prompt tokens,
~0.75. Power-of-two picks one of two replicas at random for each turn, so a
turn lands where its conversation was last served with probability 1/2. Three
regimes, by per-replica cache size:

* no pressure (2048 blocks): power-of-two also hits any replica that served
  the conversation earlier (turn t: 1 - 2^-(t-1)), ratio ~1.3;
* moderate pressure (512-768): only the replica that served the last turn
  still holds the conversation, so power-of-two hits about half as often and
  the ratio sits around 2 (1.5-2.1 measured, depending on its coin flips);
* heavy pressure (448, below half the ~1040-block working set plus the
  running requests): power-of-two makes every replica hold every
  conversation, LRU evicts a conversation's history between its turns even
  on the replica that served it, and the ratio passes 2; the prefix router's
  replicas each hold only their half and lose little (0.69 vs the 0.74
  ceiling).

So a hit-rate ratio of 2 with two replicas needs a cache that holds about
the prefix router's share of the working set and not much more (more
replicas raise the ceiling: ~N). Time to first token separates the routers
far more at every size, since a miss prefills ~1000 tokens. Shared prompts
(``--share`` > 1) let power-of-two hit a prompt that
any earlier conversation left on the replica it picks, which lowers the
ratio further. Power-of-two's choices are not seedable from here, so its
numbers vary from run to run (hit rate +-0.07 between runs at one size).
The table also lists requests per replica (from the metrics board): the
prefix router must not buy its hits with imbalance.

Why the default is under pressure. With shared prompts and a cache that holds
the working set (640 blocks), power-of-two already hit 0.60-0.84 of the prompt
tokens while no router can pass ~0.87 (each prompt's first turn is cold), so
a hit-rate ratio of 1.4 is out of reach by arithmetic and only the cost of the
routing shows. At 0.45 of the working set power-of-two makes every replica
hold every prompt and conversation and LRU evicts them between turns, the
regime in which a prefix-aware router is worth running; one fraction for
every sharing keeps the points comparable.

Measured: benchmarks/serve_results.md (the default sweep; the runs at 640
blocks), benchmarks/serve_results_pressure.md (how the pressure runs led to
the router's tie-break and short-match rule).

Prints the tables after every point, with the memory copy bandwidth and the load
average, and writes benchmarks/results/serve.json.

Usage: python benchmarks/serve.py [--conversations 16] [--share 1,2,4] [--replicas 2,3,4] [--seeds 0,1,2]
       [--turns 4] [--concurrency 4] [--think-s 2] [--cache-fraction 0.45 | --num-blocks 640,448]
       [--routers cost,prefix,pow2]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serve_report import percentile, print_tables, ratios, summarize  # noqa: E402,F401  (percentile: re-exported)
from serve_client import RunResult, measure, prefix_counters, warm_up  # noqa: E402
from serve_workload import QUESTIONS, Conversation, build_workload, working_set_blocks  # noqa: E402

# ------------------------------------------------------------------ Ray / Serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve() -> int:
    """Local Ray (as tests/ray_fixtures.py) + Serve's proxy on 127.0.0.1:<free port>."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             object_store_memory=150 * 1024**2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def app_args(router: str, num_blocks: int, replicas: int, args) -> dict:
    return dict(router=router, replicas=replicas, max_num_seqs=args.concurrency, max_waiting_requests=16,
                num_blocks=num_blocks, num_threads=1, worker_cpus=0.5, max_model_len=2048,
                metrics_interval_s=METRICS_INTERVAL_S)


METRICS_INTERVAL_S = 0.25


async def counters_now(base_url: str, app: str) -> tuple[float, float, dict[str, int]]:
    """(prefix queries, prefix hits, finished requests per replica) once every replica pushed."""
    import ray

    from tierserve.server.metrics import BOARD_NAMESPACE, metrics_board_name

    await asyncio.sleep(4 * METRICS_INTERVAL_S)
    queries, hits = await asyncio.to_thread(prefix_counters, base_url)
    board = ray.get_actor(metrics_board_name(app), namespace=BOARD_NAMESPACE)
    snaps = await board.collect.remote()
    return queries, hits, {r: sum(s.requests_finished.values()) for r, s in snaps.items()}


async def drive(router: str, base_url: str, app: str, workload: list[Conversation], args) -> RunResult:
    """Warm-up, then the measured workload."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        model = (await client.models.list()).data[0].id
        await warm_up(client, model, args.warmup)
        q0, h0, n0 = await counters_now(base_url, app)
        wall, records = await measure(client, model, workload, args)
        q1, h1, n1 = await counters_now(base_url, app)
    finally:
        await client.close()
    per_replica = sorted((n1[r] - n0.get(r, 0) for r in n1), reverse=True)
    return RunResult(router, wall, records, q1 - q0, h1 - h0, per_replica)


def run_router(router: str, num_blocks: int, replicas: int, port: int, workload: list[Conversation],
               args) -> RunResult:
    """Deploy a fresh app with ``router``, drive the workload through it, tear it down."""
    from ray import serve

    from tierserve.server.app import build_app, delete_app

    app = f"bench-{router}"
    serve.run(build_app(app_args(router, num_blocks, replicas, args)), name=app, route_prefix=f"/{app}")
    try:
        return asyncio.run(drive(router, f"http://127.0.0.1:{port}/{app}", app, workload, args))
    finally:
        delete_app(app)


@functools.cache
def tokenizer():
    """The served model's tokenizer (the embedded default's), for sizing the cache against the workload."""
    from tierserve.engine.model_source import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@functools.cache
def _working_set(share: int, seed: int, conversations: int, turns: int, passage_chars: int, max_tokens: int) -> int:
    workload = build_workload(conversations, conversations // share, turns, passage_chars, 0.0, seed)
    return working_set_blocks(workload, tokenizer(), max_tokens)


def blocks_for_share(share: int, args) -> int:
    """``--cache-fraction`` of the largest working set over the seeds at this sharing (one size for all
    seeds, so their means group by it)."""
    ws = max(_working_set(share, seed, args.conversations, args.turns, args.passage_chars, args.max_tokens)
             for seed in args.seeds)
    return math.ceil(args.cache_fraction * ws)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--share", default="1,2,4", help="comma list: conversations per system prompt")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--think-s", type=float, default=2.0, help="mean user think time between turns (0: none)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--passage-chars", type=int, default=3600)
    ap.add_argument("--replicas", default="2,3,4", help="comma list: LLMServer replicas")
    ap.add_argument("--num-blocks", default=None, help="comma list: per-replica KV blocks (overrides --cache-fraction)")
    ap.add_argument("--cache-fraction", type=float, default=0.45,
                    help="per-replica KV blocks = this fraction of each sharing's working set (default 0.45)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2", help="comma list: workload seeds (questions, think times, order)")
    ap.add_argument("--routers", default="cost,prefix,pow2", help="comma list of cost, prefix, pow2")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "serve.json"))
    args = ap.parse_args(argv)
    if args.turns > len(QUESTIONS):
        ap.error(f"--turns must be <= {len(QUESTIONS)}, got {args.turns}")
    args.share, args.replicas, args.seeds = _ints(args.share), _ints(args.replicas), _ints(args.seeds)
    if args.num_blocks is not None:
        args.num_blocks, args.cache_fraction = _ints(args.num_blocks), None
    elif not 0 < args.cache_fraction <= 4:
        ap.error(f"--cache-fraction must be in (0, 4], got {args.cache_fraction}")
    for share in args.share:
        if share < 1 or args.conversations % share:
            ap.error(f"--share values must divide --conversations ({args.conversations}), got {share}")
    return args


def write_results(args, rows: list[dict], rat: list[dict], results: dict[str, RunResult]) -> None:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "summary": rows, "ratios": rat,
                   "requests": {k: [asdict(x) for x in r.records] for k, r in results.items()}}, f, indent=2)


def main(argv=None) -> None:
    from decode import memcopy_bandwidth  # benchmarks/decode.py

    args = parse_args(argv)
    port = start_serve()
    results, rows, rat = {}, [], []
    sizes = args.num_blocks or [None]  # None: sized per sharing by --cache-fraction, below
    points = [(n, sh, seed, nb) for n in args.replicas for sh in args.share for seed in args.seeds for nb in sizes]
    for replicas, share, seed, nb in points:
        workload = build_workload(args.conversations, args.conversations // share, args.turns, args.passage_chars,
                                  args.think_s, seed)
        if nb is None:
            nb = blocks_for_share(share, args)
        point = {"replicas": replicas, "share": share, "seed": seed, "num_blocks": nb}
        by_router = {}
        for router in args.routers.split(","):
            t = time.perf_counter()
            args.seed = seed  # the conversations' start order (measure)
            res = run_router(router, nb, replicas, port, workload, args)
            results[f"{router}@r{replicas}s{share}seed{seed}b{nb}"] = res
            by_router[router] = summarize(res, point)
            print(f"[{router} @ {point}] done in {time.perf_counter() - t:.1f}s", flush=True)
        rows.extend(by_router.values())
        if "pow2" in by_router:  # every other router against the baseline of the same point
            rat.extend(ratios(row, by_router["pow2"]) for name, row in by_router.items() if name != "pow2")
        # after every point: a sweep that dies later keeps what it measured
        print_tables(rows, rat, f"memcopy {memcopy_bandwidth():.1f} GB/s, load average {os.getloadavg()[0]:.2f}")
        write_results(args, rows, rat, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
