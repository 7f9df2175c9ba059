"""LLM-aware autoscaling vs Ray Serve's ``target_ongoing_requests`` under on/off bursty load.

One process starts a local Ray and Serve (benchmarks/serve.py ``start_serve``) and, one after the
other, deploys the tierserve app of the default SmolLM2-135M model twice with autoscaling on
(``min_replicas 1``, ``initial 1``, ``max_replicas`` ``--max-replicas``):

* ``llm``: ``autoscaler: llm`` (server/autoscaling.py ``LLMAutoscalingPolicy``: KV usage, waiting
  requests and TTFT against ``autoscale_target_*``; TTFT target ``--target-ttft-s``);
* ``requests``: ``autoscaler: requests``, Serve's default policy on ongoing requests per replica
  (``--target-ongoing``, default ``max_num_seqs``: one full batch per replica).

Both get the same upscale / downscale delays (``--upscale-delay-s``, ``--downscale-delay-s``; the
app passes them to either policy) and Serve's default 30 s look-back. Each run sends the same
open-loop load: ``--cycles`` cycles of ``--on-s`` seconds of Poisson arrivals at ``--rate`` requests/s
then ``--off-s`` seconds of silence (arrival times seeded by ``--seed``, identical for both runs). A
request is a streamed chat completion of one of ``QUESTIONS`` (short, distinct prompts: no shared
prefix beyond the chat template), ``max_tokens`` ``--max-tokens``, temperature 0, through the openai
client. The arrivals do not wait for answers, so an under-provisioned deployment queues and its TTFT
grows; a 429 or 503 counts as a miss.

Measured per run, over the load window (first arrival to last answer):

* TTFT-SLO attainment: fraction of requests whose first content chunk came within ``--slo-s`` (failed
  requests count as misses); TTFT p50 / p95 of the answered ones;
* replica-seconds: replicas of the LLMServer deployment that are starting or running (``serve.status()``
  sampled every ``SAMPLE_S``), integrated over the window; the mean and the peak replica count.

Printed: a table of both runs, attainment difference (llm - requests) and the replica-seconds ratio
(llm / requests), with the targets of the issue: higher attainment at no more replica-seconds. The
memory copy bandwidth (benchmarks/decode.py ``memcopy_bandwidth``) and the load average are printed
beside the table: on a shared CPU they say how much the machine gave. Writes benchmarks/results/autoscale.json.

Usage: python benchmarks/autoscale.py [--rate 2] [--on-s 40] [--off-s 30] [--cycles 3] [--slo-s 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import percentile, start_serve  # noqa: E402  (benchmarks/serve.py)

#: Seconds between two samples of the replica count.
SAMPLE_S = 1.0
QUESTIONS = [f"In two sentences, what is {topic}?" for topic in (
    "a lighthouse", "photosynthesis", "a sonnet", "the tide", "a glacier", "an orchestra", "a comet", "yeast",
    "a bridge truss", "a sundial", "a printing press", "a coral reef", "a windmill", "an abacus", "a volcano",
    "a library", "a compass", "a canal lock", "a beehive", "a telescope")]


@dataclass
class Req:
    at_s: float                    # arrival offset in the load window
    ttft_s: float | None = None    # None: failed (429 / 503 / error)
    error: str | None = None


@dataclass
class Run:
    policy: str
    requests: list[Req] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)   # (seconds into the window, replicas)
    wall_s: float = 0.0


def arrivals(args) -> list[float]:
    rng, out = random.Random(args.seed), []
    for c in range(args.cycles):
        t = c * (args.on_s + args.off_s)
        while True:
            t += rng.expovariate(args.rate)
            if t >= c * (args.on_s + args.off_s) + args.on_s:
                break
            out.append(t)
    return out


async def one(client, model: str, i: int, req: Req, max_tokens: int) -> None:
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=max_tokens, temperature=0, stream=True)
        async for chunk in stream:
            if req.ttft_s is None and chunk.choices and chunk.choices[0].delta.content:
                req.ttft_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a refused or failed request is an SLO miss
        req.ttft_s, req.error = None, f"{type(exc).__name__}: {str(exc)[:120]}"


def replicas_now(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["LLMServer"]
    return sum(n for state, n in dep.replica_states.items() if str(state).split(".")[-1] in ("STARTING", "RUNNING"))


async def sample(app: str, t0: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append((time.perf_counter() - t0, await asyncio.to_thread(replicas_now, app)))
        await asyncio.sleep(SAMPLE_S)


async def drive(policy: str, base_url: str, app: str, times: list[float], args) -> Run:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    run = Run(policy, [Req(t) for t in times])
    try:
        model = (await client.models.list()).data[0].id
        await one(client, model, 0, Req(0.0), 2)  # first-call costs, not measured
        stop = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample(app, t0, run.samples, stop))
        tasks = []
        for i, req in enumerate(run.requests):
            await asyncio.sleep(max(0.0, req.at_s - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(one(client, model, i, req, args.max_tokens)))
        await asyncio.gather(*tasks)
        run.wall_s = time.perf_counter() - t0
        stop.set()
        await sampler
    finally:
        await client.close()
    return run


def app_args(policy: str, args) -> dict:
    return dict(replicas=1, min_replicas=1, max_replicas=args.max_replicas, autoscaler=policy,
                target_ongoing_requests=float(args.target_ongoing or args.max_num_seqs),
                autoscale_target_ttft_s=args.target_ttft_s, autoscale_upscale_delay_s=args.upscale_delay_s,
                autoscale_downscale_delay_s=args.downscale_delay_s, max_num_seqs=args.max_num_seqs,
                max_waiting_requests=args.max_waiting, num_blocks=256, num_threads=1, worker_cpus=0.5,
                max_model_len=512, metrics_interval_s=0.5)


def run_policy(policy: str, port: int, times: list[float], args) -> Run:
    from ray import serve

    from tierserve.server.app import build_app, delete_app

    app = f"autoscale-{policy}"
    serve.run(build_app(app_args(policy, args)), name=app, route_prefix=f"/{app}")
    try:
        return asyncio.run(drive(policy, f"http://127.0.0.1:{port}/{app}", app, times, args))
    finally:
        delete_app(app)


def summarize(run: Run, slo_s: float) -> dict:
    ok = [r.ttft_s for r in run.requests if r.ttft_s is not None]
    met = sum(1 for t in ok if t <= slo_s)
    rs, prev_t, prev_n = 0.0, 0.0, 1
    for t, n in run.samples:
        rs += (t - prev_t) * prev_n
        prev_t, prev_n = t, n
    rs += max(0.0, run.wall_s - prev_t) * prev_n
    return {"policy": run.policy, "requests": len(run.requests), "failed": len(run.requests) - len(ok),
            "slo_attainment": met / len(run.requests) if run.requests else 0.0,
            "ttft_p50_s": percentile(ok, 50) if ok else float("nan"),
            "ttft_p95_s": percentile(ok, 95) if ok else float("nan"),
            "replica_s": rs, "mean_replicas": rs / run.wall_s if run.wall_s else 0.0,
            "peak_replicas": max((n for _, n in run.samples), default=0), "wall_s": run.wall_s}


def print_table(rows: list[dict], args, bandwidth: float) -> None:
    cols = [("policy", "{}"), ("requests", "{}"), ("failed", "{}"), ("slo_attainment", "{:.3f}"),
            ("ttft_p50_s", "{:.2f}"), ("ttft_p95_s", "{:.2f}"), ("replica_s", "{:.0f}"), ("mean_replicas", "{:.2f}"),
            ("peak_replicas", "{}"), ("wall_s", "{:.0f}")]
    print(f"load: {args.cycles} x ({args.on_s:g} s at {args.rate:g} req/s, {args.off_s:g} s off), "
          f"max_tokens {args.max_tokens}, TTFT SLO {args.slo_s:g} s; memcopy {bandwidth:.1f} GB/s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(" | ".join(f"{c:>14}" for c, _ in cols))
    for row in rows:
        print(" | ".join(f"{fmt.format(row[c]):>14}" for c, fmt in cols))
    by = {r["policy"]: r for r in rows}
    if {"llm", "requests"} <= set(by):
        d = by["llm"]["slo_attainment"] - by["requests"]["slo_attainment"]
        q = by["llm"]["replica_s"] / by["requests"]["replica_s"]
        print(f"llm - requests: SLO attainment {d:+.3f}; replica-seconds llm/requests {q:.2f}x "
              f"(target: higher attainment at <= 1.00x: {'met' if d > 0 and q <= 1.0 else 'MISSED'})")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second while on")
    ap.add_argument("--on-s", type=float, default=40.0)
    ap.add_argument("--off-s", type=float, default=30.0)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slo-s", type=float, default=3.0, help="TTFT service-level objective")
    ap.add_argument("--target-ttft-s", type=float, default=1.5, help="llm policy's TTFT target")
    ap.add_argument("--target-ongoing", type=float, default=None, help="Serve policy's target (default max_num_seqs)")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--max-waiting", type=int, default=32)
    ap.add_argument("--upscale-delay-s", type=float, default=5.0)
    ap.add_argument("--downscale-delay-s", type=float, default=20.0)
    ap.add_argument("--policies", default="llm,requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "autoscale.json"))
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

    times = arrivals(args)
    port = start_serve()
    rows, runs = [], {}
    for policy in args.policies.split(","):
        t = time.perf_counter()
        runs[policy] = run_policy(policy, port, times, args)
        rows.append(summarize(runs[policy], args.slo_s))
        print(f"[{policy}] done in {time.perf_counter() - t:.0f}s", flush=True)
    print_table(rows, args, memcopy_bandwidth())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "summary": rows,
                   "runs": {k: {"requests": [asdict(r) for r in v.requests], "samples": v.samples}
                            for k, v in runs.items()}}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
