"""Speculative decoding (ngram prompt lookup) vs plain decoding on SmolLM2-135M, batch 1, greedy.

Two tasks, each one request at a time:
- quote: an Austen passage (Persuasion, from its 20,000th character) followed
  by an instruction to repeat it and its first words: the output copies the
  input, so n-gram drafts hold;
- continuation: 600 characters of Emma (from its 300,000th character),
  continued freely: little of the output repeats the prompt, so ngram must
  cost (almost) nothing where it does not match.

For each task and mode: tokens/s (new tokens over the wall time of the
``generate`` call, after a warm-up), and for ngram the mean accepted length
(tokens a verifying step emits: 1 + accepted / verifications), the acceptance
rate and acceptance per draft position. Greedy outputs of the two modes are
checked token-identical. Prints a table, writes benchmarks/results/speculative.json.

Plain and ngram runs alternate and each mode keeps its best of ``--repeats``.

Measured once (2-core CPU, fp32, 48 new tokens, k = 4, best of 3, the machine quiet):

    task           plain tok/s  ngram tok/s  speedup  mean acc len  acc rate  identical  per position
    quote                39.98        67.50     1.69          1.95      0.24  True       .38 .29 .19 .10
    continuation         40.45        77.65     1.92          2.21      0.31  True       .37 .32 .32 .21

(SmolLM2's greedy continuation of Emma soon repeats its own phrases, so
lookup holds there too; runs under heavy load from other processes gave
0.5x-18x, meaningless: measure on a quiet machine.)

Usage: python benchmarks/speculative.py [--new-tokens 64] [--k 4] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve import LLM, SamplingParams
from tierserve.data.austen import austen_texts
from tierserve.models.default_model import ensure_default_model


def tasks() -> dict[str, str]:
    texts = austen_texts()
    passage = " ".join(texts["Persuasion"][20000:21000].split())
    passage = passage[passage.index(". ") + 2:]
    quote = (f"Passage:\n{passage}\n\nRepeat the passage above word for word.\n\nPassage:\n"
             f"{' '.join(passage.split()[:6])}")
    cont = " ".join(texts["Emma"][300000:300600].split()[1:])
    return {"quote": quote, "continuation": cont}


def timed(llm, prompt: str, new_tokens: int) -> tuple[float, list[int]]:
    """tokens/s of one greedy generation and its tokens."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    (out,) = llm.generate(prompt, params)
    return new_tokens / (time.perf_counter() - t), out.token_ids


def run_pair(plain, spec, prompt: str, new_tokens: int, repeats: int):
    """Best tokens/s of each mode over ``repeats`` interleaved runs (a shared machine's load hits both alike)."""
    plain.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    best_plain = best_spec = 0.0
    for _ in range(repeats):
        tps, ref = timed(plain, prompt, new_tokens)
        best_plain = max(best_plain, tps)
        tps, got = timed(spec, prompt, new_tokens)
        best_spec = max(best_spec, tps)
    return best_plain, best_spec, ref, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = ensure_default_model()
    common = {"num_blocks": 256, "max_num_seqs": 4, "num_threads": args.threads}
    plain = LLM(folder, **common)
    spec = LLM(folder, speculative="ngram", num_speculative_tokens=args.k, **common)
    rows = []
    for name, prompt in tasks().items():
        spec.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
        before = spec.engine.spec_decode_stats()
        tps_plain, tps_spec, ref, got = run_pair(plain, spec, prompt, args.new_tokens, args.repeats)
        after = spec.engine.spec_decode_stats()
        drafts = (after.num_drafts - before.num_drafts) // args.repeats  # per generation (greedy: all alike)
        accepted = (after.num_accepted_tokens - before.num_accepted_tokens) // args.repeats
        proposed = (after.num_draft_tokens - before.num_draft_tokens) // args.repeats
        per_pos = [(a - (before.accepted_per_position[i] if i < len(before.accepted_per_position) else 0))
                   // args.repeats for i, a in enumerate(after.accepted_per_position)]
        rows.append({"task": name, "prompt_tokens": len(spec.tokenizer.encode(prompt)),
                     "new_tokens": args.new_tokens, "plain_tok_s": tps_plain, "ngram_tok_s": tps_spec,
                     "speedup": tps_spec / tps_plain, "identical": got == ref, "verifications": drafts,
                     "draft_tokens": proposed, "accepted": accepted,
                     "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
                     "acceptance_rate": accepted / proposed if proposed else 0.0,
                     "accepted_per_position": [p / drafts for p in per_pos] if drafts else []})
    print(f"{'task':14s} {'plain tok/s':>11s} {'ngram tok/s':>11s} {'speedup':>8s} {'mean acc len':>12s} "
          f"{'acc rate':>8s}  identical  per-position")
    for r in rows:
        print(f"{r['task']:14s} {r['plain_tok_s']:11.2f} {r['ngram_tok_s']:11.2f} {r['speedup']:8.2f} "
              f"{r['mean_accepted_length']:12.2f} {r['acceptance_rate']:8.2f}  {r['identical']!s:9s}  "
              + " ".join(f"{p:.2f}" for p in r["accepted_per_position"]))
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "speculative.json"), "w") as f:
        json.dump({"k": args.k, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
