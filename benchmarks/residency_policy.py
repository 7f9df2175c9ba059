"""Cold-hit rate of residency policies on the recorded routing trace: static hot set, LRU, prefetch, ring.

Trace: benchmarks/traces/smollm2_moe_austen.json (the MoEfied SmolLM2 on *Emma*:
30 layers x 8 experts, top-4, 511 tokens in text order), as recorded and mapped
by popularity rank onto the Qwen3-30B-A3B shape (30 layers x 128 experts, top-8:
tierserve/offload/routing_trace.py ``map_by_rank``). Calibration: the first
half of the tokens (the static ranking, and the start of LRU); evaluation: the
second half, one token per step. Policies and the cold-hit rate (routed
(token, slot) assignments whose expert the worker did not hold when the step
started): tierserve/offload/residency_policy.py; ``ring`` is the rule the engine runs with
``offload_prefetch=previous_step`` (a static hot set plus a ring of spare slots filled from the
previous step's routing); benchmarks/offload_gpu.py measures it live (prefetch issued / used /
wasted). Residency = capacity per layer / experts per layer.

Target (issue: GPU worker with CPU expert hosts): prefetch's cold-hit rate below
the static hot set's at the same residency. Pure Python over the trace: no
model runs, the figures are the same on any machine.

Usage: python benchmarks/residency_policy.py [--out DIR]   (writes DIR/residency_policy.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.offload.residency_policy import POLICIES, cold_hit_rate  # noqa: E402
from tierserve.offload.routing_trace import RoutingTrace, map_by_rank  # noqa: E402

TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "smollm2_moe_austen.json")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--trace", default=TRACE)
    args = ap.parse_args()
    source = RoutingTrace.load(args.trace)
    traces = {"recorded 8x top-4": source,
              "mapped 128x top-8": map_by_rank(source, 128, 8, len(source.layers))}
    n = source.num_tokens
    calib, evaluate = range(0, n // 2), range(n // 2, n)
    rows = []
    print(f"{len(source.layers)} layers, {n} tokens: calibration {len(calib)}, evaluation {len(evaluate)}")
    print(f"{'trace':<20}{'residency':>10}" + "".join(f"{p:>10}" for p in POLICIES) + "  prefetch < static")
    for name, trace in traces.items():
        for pct in (50, 25, 10):
            cap = max(1, round(pct / 100 * trace.num_experts))
            rates = {p: cold_hit_rate(trace, cap, p, calib, evaluate) for p in POLICIES}
            rows.append(dict(trace=name, residency_pct=pct, capacity=cap, **rates))
            print(f"{name:<20}{pct:>9}%" + "".join(f"{rates[p]:10.3f}" for p in POLICIES)
                  + f"  {'yes' if rates['prefetch'] < rates['static'] else 'NO'}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "residency_policy.json"), "w") as f:
        json.dump(dict(trace=os.path.basename(args.trace), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
