"""The tables of benchmarks/serve.py: per-run summary, router ratios per sweep point, targets.

A sweep point is (replicas, conversations per prompt, seed, KV blocks per replica); each runs every
router on fresh replicas. Per run (``summarize``): requests, hit rate = cached / prompt tokens of the
measured requests (and the same from /metrics), TTFT p50 / p95 (nearest rank), e2e p50, output tokens/s,
requests/s, wall time and requests per replica (from the metrics board). Per point and router other than
power-of-two (``ratios``: ``prefix``, the prefix-aware router; ``cost``, Router v2): hit rate router/pow2,
TTFT p50 and p95 pow2/router, throughput router/pow2. Per (router, replicas, sharing, blocks) over the
seeds (``by_setting``): the mean of each ratio, with the issue's targets: p95 TTFT no worse than power-of-two's within 10% (ratio >= 1 / 1.1), p50 TTFT >= 2x better
(every conversation reuses its prompt and history over its turns) and hit rate >= 1.4x.
"""

from __future__ import annotations

import math
from statistics import mean

#: Targets of the issue (ratios prefix vs power-of-two).
P95_AT_LEAST = 1 / 1.1
P50_AT_LEAST = 2.0
HIT_AT_LEAST = 1.4
POINT_KEYS = ("replicas", "share", "seed", "num_blocks")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize(r, point: dict) -> dict:
    recs = r.records
    prompt = sum(x.prompt_tokens for x in recs)
    cached = sum(x.cached_tokens for x in recs)
    ttft = [x.ttft_s for x in recs]
    return {
        **point, "router": r.router, "requests": len(recs), "wall_s": r.wall_s,
        "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt if prompt else 0.0,
        "metrics_hit_rate": r.metrics_hits / r.metrics_queries if r.metrics_queries else 0.0,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "e2e_p50_s": percentile([x.e2e_s for x in recs], 50),
        "output_tok_s": sum(x.completion_tokens for x in recs) / r.wall_s,
        "req_s": len(recs) / r.wall_s,
        "requests_per_replica": r.requests_per_replica,
    }


RATIO_KEYS = ("hit_over_pow2", "p50_pow2_over", "p95_pow2_over", "tok_s_over_pow2")


def ratios(p: dict, b: dict) -> dict:
    """Router ``p`` (a summary row) against power-of-two's row ``b`` of the same point."""
    div = lambda a, c: a / c if c else float("inf")  # noqa: E731
    return {**{k: p[k] for k in POINT_KEYS}, "router": p["router"],
            "hit_over_pow2": div(p["hit_rate"], b["hit_rate"]),
            "p50_pow2_over": div(b["ttft_p50_s"], p["ttft_p50_s"]),
            "p95_pow2_over": div(b["ttft_p95_s"], p["ttft_p95_s"]),
            "tok_s_over_pow2": div(p["output_tok_s"], b["output_tok_s"])}


def by_setting(rat: list[dict]) -> list[dict]:
    """Mean ratios over the seeds of each (router, replicas, share, num_blocks), with the targets met or not."""
    groups: dict[tuple, list[dict]] = {}
    for r in rat:
        groups.setdefault((r["router"], r["replicas"], r["share"], r["num_blocks"]), []).append(r)
    out = []
    for (router, replicas, share, nb), rs in sorted(groups.items()):
        row = {"router": router, "replicas": replicas, "share": share, "num_blocks": nb, "seeds": len(rs)}
        for k in RATIO_KEYS:
            row[k] = mean(r[k] for r in rs)
        row["p95_ok"] = row["p95_pow2_over"] >= P95_AT_LEAST
        row["p50_ok"] = row["p50_pow2_over"] >= P50_AT_LEAST
        row["hit_ok"] = row["hit_over_pow2"] >= HIT_AT_LEAST
        out.append(row)
    return out


def _print(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    print(" | ".join(f"{c:>12}" for c, _ in cols))
    for row in rows:
        print(" | ".join(f"{fmt.format(row[c]):>12}" for c, fmt in cols))


def print_tables(rows: list[dict], rat: list[dict], header: str) -> None:
    print(header)
    _print(rows, [("replicas", "{}"), ("share", "{}"), ("seed", "{}"), ("num_blocks", "{}"), ("router", "{}"),
                  ("requests", "{}"), ("hit_rate", "{:.3f}"), ("metrics_hit_rate", "{:.3f}"),
                  ("ttft_p50_s", "{:.3f}"), ("ttft_p95_s", "{:.3f}"), ("output_tok_s", "{:.2f}"),
                  ("req_s", "{:.3f}"), ("wall_s", "{:.1f}"), ("requests_per_replica", "{}")])
    if not rat:
        return
    print("ratios (router vs pow2) per setting, mean over seeds; targets: p95 pow2/router >= "
          f"{P95_AT_LEAST:.3f}, p50 >= {P50_AT_LEAST:g}x, hit rate >= {HIT_AT_LEAST:g}x")
    _print(by_setting(rat), [("router", "{}"), ("replicas", "{}"), ("share", "{}"), ("num_blocks", "{}"),
                             ("seeds", "{}"), *[(k, "{:.2f}") for k in RATIO_KEYS],
                             ("hit_ok", "{}"), ("p50_ok", "{}"), ("p95_ok", "{}")])
