"""Speculative decoding (ngram prompt lookup) vs plain decoding on SmolLM2-135M, batch 1.

Three tasks, each one request at a time:
- quote: an Austen passage (Persuasion, from its 20,000th character) followed
  by an instruction to repeat it and its first words: the output copies the
  input, so n-gram drafts hold;
- continuation: 600 characters of Emma (from its 300,000th character),
  continued freely (greedy);
- sampled: the same Emma passage continued by sampling at temperature 1.5
  (seeded): drafts are proposed (some token always recurs) but the target
  rarely agrees, so this is where ngram must cost (almost) nothing. A third
  mode, ngram with ``draft_backoff=True`` (tierserve/engine/spec_decode/gate.py:
  a failing request pauses its proposals), shows what the back-off changes.

For each task and mode: tokens/s (new tokens over the wall time of the
``generate`` call, after a warm-up), and for ngram the mean accepted length
(tokens a verifying step emits: 1 + accepted / verifications), the acceptance
rate and acceptance per draft position. Greedy outputs of the two modes are
checked token-identical (greedy tasks; a sampled run keeps the distribution,
not the tokens). Prints the machine's copy bandwidth and a table, writes
benchmarks/results/speculative.json.

Plain and ngram runs alternate and each mode keeps its best of ``--repeats``.

Measured (2-core CPU shared with other jobs, copy bandwidth 22.7 GB/s, fp32,
64 new tokens, k = 4, best of 3; "backoff" is ngram with draft_backoff=True):

    task          plain tok/s ngram tok/s speedup    backoff speedup verif mean acc len acc rate
    quote               48.50       88.88    1.83      68.67    1.42  24.0         2.38     0.34
    continuation        50.93      107.75    2.12     108.46    2.13  22.0         2.64     0.41
    sampled             48.28       47.82    0.99      47.25    0.98   9.0         1.00     0.00

(SmolLM2's greedy continuation of Emma soon repeats its own phrases, so
lookup holds there too. Where drafts fail (sampled) ngram stays within 1% of
plain decoding: at batch 1 the step is bound by reading the weights, so
verifying 1 + 4 positions costs about one. Runs under heavy load from other
processes have given 0.5x-18x, meaningless: compare within one run.)

Usage: python benchmarks/speculative.py [--new-tokens 64] [--k 4] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve import LLM, SamplingParams
from tierserve.data.austen import austen_texts
from tierserve.models.default_model import ensure_default_model
from tierserve.tools.calibration import HELDOUT_NOVELS

from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)


def held_out_passages(n: int) -> list[str]:
    """``n`` 600-character passages of the held-out novels (never in train-draft's data), evenly spaced."""
    texts = austen_texts()
    out = []
    for i in range(n):
        text = texts[HELDOUT_NOVELS[i % 2]]
        start = 100000 + 37000 * (i // 2)
        out.append(" ".join(text[start:start + 600].split()[1:]))
    return out


def tasks(batch: int) -> dict[str, tuple[list[str], SamplingParams]]:
    texts = austen_texts()
    passage = " ".join(texts["Persuasion"][20000:21000].split())
    passage = passage[passage.index(". ") + 2:]
    quote = (f"Passage:\n{passage}\n\nRepeat the passage above word for word.\n\nPassage:\n"
             f"{' '.join(passage.split()[:6])}")
    cont = held_out_passages(batch)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(temperature=1.5, seed=7, ignore_eos=True)
    if batch > 1:
        return {"continuation": (cont, greedy)}
    return {"quote": ([quote], greedy), "continuation": (cont, greedy), "sampled": (cont, sampled)}


def timed(llm, prompts: list[str], params: SamplingParams, new_tokens: int) -> tuple[float, list[list[int]]]:
    """tokens/s of one batched generation (all new tokens over its wall time) and its tokens."""
    params = dataclasses.replace(params, max_tokens=new_tokens)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return new_tokens * len(prompts) / (time.perf_counter() - t), [o.token_ids for o in outs]


def spec_row(before, after, runs: int) -> dict:
    """Per-generation speculation figures from two ``SpecDecodeStats`` snapshots."""
    drafts = after.num_drafts - before.num_drafts
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    proposed = after.num_draft_tokens - before.num_draft_tokens
    per_pos = [a - (before.accepted_per_position[i] if i < len(before.accepted_per_position) else 0)
               for i, a in enumerate(after.accepted_per_position)]
    return {"verifications": drafts / runs, "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "accepted_per_position": [p / drafts for p in per_pos] if drafts else []}


def run_task(llms: dict, prompts: list[str], params: SamplingParams, new_tokens: int, repeats: int) -> list[dict]:
    """Best tokens/s of each engine over ``repeats`` interleaved runs (a shared machine's load hits all alike)."""
    for llm in llms.values():  # warm-up
        llm.generate(prompts, dataclasses.replace(params, max_tokens=4))
    before = {m: llm.engine.spec_decode_stats() for m, llm in llms.items()}
    best, tokens = dict.fromkeys(llms, 0.0), {}
    for _ in range(repeats):
        for mode, llm in llms.items():
            tps, tokens[mode] = timed(llm, prompts, params, new_tokens)
            best[mode] = max(best[mode], tps)
    rows = []
    for mode, llm in llms.items():
        row = {"mode": mode, "tok_s": best[mode], "speedup": best[mode] / best["plain"],
               "identical": tokens[mode] == tokens["plain"] if params.temperature == 0 else None}
        row.update(spec_row(before[mode], llm.engine.spec_decode_stats(), repeats))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--heads", default=None, help="gumiho heads folder (tierserve train-draft --out); no gumiho "
                                                  "rows without it")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    args = ap.parse_args()
    folder = ensure_default_model()
    common = {"num_blocks": 512, "max_num_seqs": 8, "num_threads": args.threads}
    k = {"num_speculative_tokens": args.k}
    llms = {"plain": LLM(folder, **common), "ngram": LLM(folder, speculative="ngram", **k, **common),
            "backoff": LLM(folder, speculative="ngram", draft_backoff=True, **k, **common)}
    if args.heads:
        llms["gumiho"] = LLM(folder, speculative="gumiho", speculative_model=args.heads, **k, **common)
    bandwidth = memcopy_bandwidth()
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, (prompts, params) in tasks(batch).items():
            for r in run_task(llms, prompts, params, args.new_tokens, args.repeats):
                rows.append({"task": name, "batch": batch, "temperature": params.temperature, **r})
    print(f"copy bandwidth {bandwidth:.1f} GB/s; k = {args.k}, {args.new_tokens} new tokens per request, "
          f"best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'task':13s} {'batch':>5s} {'mode':8s} {'tok/s':>8s} {'speedup':>7s} {'verif':>6s} {'mean acc len':>12s} "
          f"{'acc rate':>8s}  identical  acceptance per position")
    for r in rows:
        ident = "-" if r["identical"] is None else str(r["identical"])
        print(f"{r['task']:13s} {r['batch']:5d} {r['mode']:8s} {r['tok_s']:8.2f} {r['speedup']:7.2f} "
              f"{r['verifications']:6.1f} {r['mean_accepted_length']:12.2f} {r['acceptance_rate']:8.2f}  {ident:9s}  "
              + " ".join(f"{p:.2f}" for p in r["accepted_per_position"]))
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "speculative.json"), "w") as f:
        json.dump({"k": args.k, "copy_bandwidth_gb_s": bandwidth, "heads": args.heads, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
