"""benchmarks/serve_report.py: ratios against power-of-two, the means over seeds with the targets, and the
merge of several results files (a later file's run replaces an earlier one's): exact figures."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from serve_report import by_setting, markdown, merge, ratios  # noqa: E402


def row(router: str, seed: int, hit: float, p50: float, p95: float, tok_s: float = 10.0,
        replicas: int = 2, share: int = 4, per_replica=(8, 8)) -> dict:
    return {"replicas": replicas, "share": share, "seed": seed, "num_blocks": 168, "router": router,
            "hit_rate": hit, "ttft_p50_s": p50, "ttft_p95_s": p95, "output_tok_s": tok_s,
            "requests_per_replica": list(per_replica)}


def test_ratios_are_router_over_pow2_for_hits_and_pow2_over_router_for_latency():
    r = ratios(row("cost", 0, 0.6, 0.5, 2.0, tok_s=15.0), row("pow2", 0, 0.4, 2.0, 2.2))
    assert (r["hit_over_pow2"], r["p50_pow2_over"], r["p95_pow2_over"], r["tok_s_over_pow2"]) == \
        (0.6 / 0.4, 4.0, 2.2 / 2.0, 1.5)
    assert (r["replicas"], r["share"], r["seed"], r["num_blocks"], r["router"]) == (2, 4, 0, 168, "cost")


def test_mean_over_seeds_decides_the_targets():
    rat = [ratios(row("cost", 0, 0.56, 1.0, 1.0), row("pow2", 0, 0.4, 3.0, 0.8)),  # hit 1.4, p50 3, p95 0.8
           ratios(row("cost", 1, 0.60, 1.0, 1.0), row("pow2", 1, 0.4, 1.0, 1.1))]  # hit 1.5, p50 1, p95 1.1
    (m,) = by_setting(rat)
    assert m["seeds"] == 2
    assert abs(m["hit_over_pow2"] - 1.45) < 1e-12 and m["p50_pow2_over"] == 2.0
    assert abs(m["p95_pow2_over"] - 0.95) < 1e-12
    assert (m["hit_ok"], m["p50_ok"], m["p95_ok"]) == (True, True, True)


def test_merge_later_file_wins_and_markdown_lists_every_miss(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"summary": [row("cost", 0, 0.2, 9.0, 9.0), row("pow2", 0, 0.4, 2.0, 2.0),
                                         row("cost", 1, 0.8, 1.0, 2.0, per_replica=(10, 6)),
                                         row("pow2", 1, 0.4, 3.0, 1.0)]}))
    # seed 0 again: replaces a's run; seed 2 has no power-of-two run and so no ratio
    b.write_text(json.dumps({"summary": [row("cost", 0, 0.8, 0.5, 1.0, per_replica=(9, 7)),
                                         row("pow2", 0, 0.4, 2.0, 2.0), row("cost", 2, 0.9, 1.0, 1.0)]}))
    rows, rat = merge([str(a), str(b)])
    assert len(rows) == 5 and len(rat) == 2
    by_seed = {r["seed"]: r for r in rat}
    assert (by_seed[0]["hit_over_pow2"], by_seed[0]["p50_pow2_over"], by_seed[0]["p95_pow2_over"]) == (2.0, 4.0, 2.0)
    assert (by_seed[1]["hit_over_pow2"], by_seed[1]["p50_pow2_over"], by_seed[1]["p95_pow2_over"]) == (2.0, 3.0, 0.5)
    lines = markdown(rows, rat).splitlines()
    assert lines[2] == "| replicas | share | blocks | seed 0 | seed 1 | mean | misses |"
    assert lines[4] == ("| 2 | 4 | 168 | 2.00 / 4.00 / 2.00 (9/7) | 2.00 / 3.00 / 0.50 (10/6) | "
                        "2.00 / 3.50 / 1.25 | seed 1 p95 |")
