"""The printed report of benchmarks/offload.py: decode table, long prefill, target ratios, round trip, REAP.

Ratios (the issue's targets) are taken at ``compare`` residency and the largest batch:
each fused variant's tok/s over all-resident (target >= 0.70), over the Ray naive
baseline (target >= 2.0) and, for information, over the socket naive baseline.
"""

from __future__ import annotations


def print_report(rows: list[dict], compare: float, rtt: dict, reap: list[dict], batches: tuple[int, ...],
                 long_prompt_tokens: int) -> dict:
    """Print the decode, long-prefill, ratio, round-trip and REAP tables; return the target ratios."""
    print(f"{'run':<17} {'resident':>8} {'batch':>5} {'tok/s':>8} {'kept':>6} {'left wkr':>8} {'spare':>6} "
          f"{'act B/tok':>10} {'wt B/tok':>10} {'msg/tok':>8} {'pf left':>7} {'pf spare':>8} {'identical':>9}")
    base = {r["batch"]: r["tok_s"] for r in rows if r["label"] == "all-resident"}
    for r in rows:
        print(f"{r['label']:<17} {r['fraction_resident']:>8.3f} {r['batch']:>5} {r['tok_s']:>8.2f} "
              f"{r['tok_s'] / base[r['batch']]:>6.2f} {r['left_worker']:>8.3f} {r['spare']:>6.3f} "
              f"{r['act_bytes_per_tok']:>10.0f} {r['weight_bytes_per_tok']:>10.0f} {r['messages_per_tok']:>8.1f} "
              f"{r['prefill_left_worker']:>7.3f} {r['prefill_spare']:>8.3f} {str(r['identical']):>9}")
    print(f"prefill of one {long_prompt_tokens}-token prompt (the spare-slot cost model's case: many rows per expert):")
    long_base = next(r["long_prefill_s"] for r in rows if r["label"] == "all-resident" and "long_prefill_s" in r)
    for r in rows:
        if "long_prefill_s" in r:
            print(f"  {r['label']:<17} {r['fraction_resident']:>6.3f} {r['long_prefill_s']:>7.3f}s "
                  f"x{r['long_prefill_s'] / long_base:>5.2f} left {r['long_prefill_left']:.3f} "
                  f"spare {r['long_prefill_spare']:.3f} weights {r['long_prefill_weight_bytes'] / 2**20:.1f} MiB")
    for r in rows:
        if r["cost_model"] and r["batch"] == batches[0]:
            print(f"  {r['label']}: measured CostModel " + ", ".join(f"{k}={v:.3g}" for k, v in r["cost_model"].items()))
    at = {r["label"]: r for r in rows if r["batch"] == max(batches) and r["residency"] == compare}
    ratios = {}
    naive, naive_socket = at.get("naive"), at.get("naive(socket)")
    print(f"ratios at {compare:.0%} residency, batch {max(batches)} (targets: >= 0.70 of all-resident, "
          f">= 2.0x naive):")
    for label in ("calibrated", "calibrated+cache", "uniform"):
        if label not in at:
            continue
        vs_all = at[label]["tok_s"] / base[max(batches)]
        vs_naive = at[label]["tok_s"] / naive["tok_s"] if naive else float("nan")
        vs_socket = at[label]["tok_s"] / naive_socket["tok_s"] if naive_socket else float("nan")
        ratios[label] = dict(vs_all_resident=vs_all, vs_naive=vs_naive, vs_naive_socket=vs_socket)
        print(f"  {label:<17} / all-resident {vs_all:5.2f} [{'PASS' if vs_all >= 0.70 else 'FAIL'}]   "
              f"/ naive {vs_naive:5.2f}x [{'PASS' if vs_naive >= 2.0 else 'FAIL'}]   "
              f"/ naive(socket) {vs_socket:5.2f}x")
    if rtt:
        print("ExpertHost.compute round trip, median ms (decode payloads):")
        for k, v in rtt.items():
            print(f"  {k:<32} {v:7.3f}")
    if reap:
        print("held-out perplexity after pruning (fraction of experts removed per layer):")
        for r in reap:
            print(f"  {r['method']:<10} {r['ratio']:>5.2f} {r['perplexity']:>10.3f}")
    return ratios
