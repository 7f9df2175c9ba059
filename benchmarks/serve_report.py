"""The tables of benchmarks/serve.py: per-run summary, router ratios per sweep point, targets.

A sweep point is (replicas, conversations per prompt, seed, KV blocks per replica); each runs every
router on fresh replicas. Per run (``summarize``): requests, hit rate = cached / prompt tokens of the
measured requests (and the same from /metrics), TTFT p50 / p95 (nearest rank), e2e p50, output tokens/s,
requests/s, wall time and requests per replica (from the metrics board). Per point and router other than
power-of-two (``ratios``: ``prefix``, the prefix-aware router; ``cost``, Router v2): hit rate router/pow2,
TTFT p50 and p95 pow2/router, throughput router/pow2. Per (router, replicas, sharing, blocks) over the
seeds (``by_setting``): the mean of each ratio, with the issue's targets: p95 TTFT no worse than
power-of-two's within 10% (ratio >= 1 / 1.1), p50 TTFT >= 2x better (every conversation reuses its prompt
and history over its turns) and hit rate >= 1.4x.

Run as a script on results files of serve.py (``python benchmarks/serve_report.py results/a.json ...``) it
merges their runs (a later file's run of the same point and router replaces an earlier one) and prints one
markdown table per router: each (replicas, sharing) with every seed's hit x / p50 x / p95 x and the router's
requests per replica, the mean over the seeds, and the misses against the targets, per seed and on the mean.
"""

from __future__ import annotations

import argparse
import json
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


TARGETS = (("hit", "hit_over_pow2", HIT_AT_LEAST), ("p50", "p50_pow2_over", P50_AT_LEAST),
           ("p95", "p95_pow2_over", P95_AT_LEAST))


def _misses(r: dict) -> list[str]:
    return [name for name, key, limit in TARGETS if r[key] < limit]


def merge(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Summary rows of several results files, one per (point, router), later files first; and the ratios of
    every router against power-of-two at each point that has both."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["summary"]:
                rows[(*(row[k] for k in POINT_KEYS), row["router"])] = row
    rat = [ratios(row, rows[(*key[:-1], "pow2")]) for key, row in sorted(rows.items())
           if key[-1] != "pow2" and (*key[:-1], "pow2") in rows]
    return list(rows.values()), rat


def markdown(rows: list[dict], rat: list[dict]) -> str:
    """Per router: one line per (replicas, share, num_blocks) with each seed's ratios and the mean."""
    per_replica = {(*(r[k] for k in POINT_KEYS), r["router"]): r["requests_per_replica"] for r in rows}
    means = {(m["router"], m["replicas"], m["share"], m["num_blocks"]): m for m in by_setting(rat)}
    seeds = sorted({r["seed"] for r in rat})
    cell = lambda r: "{:.2f} / {:.2f} / {:.2f}".format(*(r[k] for k in RATIO_KEYS[:3]))  # noqa: E731
    out = []
    for router in sorted({r["router"] for r in rat}):
        out += [f"{router} vs pow2, hit x / p50 x / p95 x (requests per replica); targets hit >= {HIT_AT_LEAST:g}, "
                f"p50 >= {P50_AT_LEAST:g}, p95 >= {P95_AT_LEAST:.3f}", "",
                "| replicas | share | blocks | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | misses |",
                "|---" * (len(seeds) + 5) + "|"]
        for key, m in sorted(means.items()):
            if key[0] != router:
                continue
            at = {r["seed"]: r for r in rat if (r["router"], r["replicas"], r["share"], r["num_blocks"]) == key}
            cells = [f"{cell(at[s])} ({'/'.join(map(str, per_replica[(*key[1:3], s, key[3], router)]))})"
                     if s in at else "" for s in seeds]
            miss = [f"seed {s} {x}" for s in seeds if s in at for x in _misses(at[s])]
            miss += [f"mean {x}" for x in _misses(m)]
            out.append(f"| {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells)
                       + f" | {cell(m)} | {', '.join(miss) or 'none'} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="merge benchmarks/serve.py results files into the report's tables")
    ap.add_argument("results", nargs="+", help="results JSON files of serve.py; later ones win per point")
    rows, rat = merge(ap.parse_args().results)
    print(markdown(rows, rat))
