"""Record the routing trace the GPU offload benchmark replays: the MoEfied SmolLM2 on Austen's text.

The MoEfied SmolLM2-135M (tierserve.tools.moefy: 30 layers x 8 experts, top-4,
built once into the cache) serves one request through the engine: a prompt
of ``--prompt-tokens`` tokens of *Emma* (from character 20000), then
``--new-tokens`` greedy tokens. ``record_routing`` (tierserve/offload/
routing_trace.py) keeps every token's top-4 expert ids per layer in the order
the tokens passed (the prompt's tokens, then one per decode step), and the
trace is written as JSON (``--out``, default benchmarks/traces/
smollm2_moe_austen.json, ~0.2 MB: small enough to travel with the tree).
Printed: per layer the share of routed slots taken by the most and the least
popular expert, and the decode steps' temporal locality (the share of a
token's experts that the previous token also used).

Usage: python benchmarks/routing_trace.py [--prompt-tokens 448] [--new-tokens 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from tierserve.data.austen import austen_texts  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.offload.routing_trace import record_routing  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402
from tierserve.tools.moefy import ensure_moe_model  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "smollm2_moe_austen.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=448)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    folder = ensure_moe_model()
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype="float32"), device="cpu",
                                 cache=CacheConfig(num_blocks=64, block_size=16),
                                 scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1024)))
    prompt = eng.tokenize(austen_texts()["Emma"][20000:20000 + 8 * args.prompt_tokens])[: args.prompt_tokens]
    trace, handle = record_routing(eng.model)
    eng.add_request(prompt, SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    handle.detach()
    eng.close()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    trace.save(args.out)
    n = trace.num_tokens
    print(f"{folder}: {len(trace.layers)} layers x {trace.num_experts} experts top-{trace.top_k}, {n} tokens "
          f"-> {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")
    decode = range(len(prompt) + 1, n)
    for j in range(len(trace.layers)):
        c = sorted(trace.counts(j), reverse=True)
        rows = trace.layers[j]
        reuse = sum(len(set(rows[t]) & set(rows[t - 1])) for t in decode) / max(1, len(decode) * trace.top_k)
        print(f"layer {j:2}: most popular expert {c[0] / n:.2f} of tokens, least {c[-1] / n:.2f}; "
              f"decode reuse of the previous token's experts {reuse:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
