"""Decode throughput of tierserve vs transformers on SmolLM2-135M fp32 (one run, same machine).

Prints a table and writes benchmarks/results/decode.json:
- tokens/s at batch 1, 8, 32 (same prompts of equal length, same number of new
  tokens, greedy, eos ignored) for transformers ``generate`` and tierserve's
  continuously batched engine on the same fp32 weights, the ratio; and, in the
  same rounds, tierserve as the embedded default runs it on the CPU (the Q4_1 GGUF
  kept packed), eager and with ``compile_decode``, against that transformers figure;
- median per-step decode time at context 128, 512, 2048, 4096 (one sequence);
- achieved weight bandwidth at batch 1 against a measured memory-copy
  bandwidth (the roofline for fp32 decode);
- the GGUF kept packed (the embedded default on the CPU) at batch 1, eager and with
  ``compile_decode`` (models/decode_compile.py);
- llama.cpp (llama_cpp) on the Q4_1 GGUF at batch 1 if importable, with the ratios.

benchmarks/decode_ab.py compares the batch-1 forms in alternating runs (medians).

Measured (``OMP_NUM_THREADS=2 python benchmarks/decode.py --threads 2 --repeats 2 --contexts 128``,
AMD EPYC AVX2 host, nothing else running, copy 12.6 GB/s; each figure includes its 32-token prompt;
results/decode.json), with decode attention over the fp32 pages by the C++ kernel
(kernels/attention/paged_decode_cpu.py):

| batch | transformers fp32 tok/s | tierserve fp32 | ratio | packed (default) | ratio | packed, compile_decode | ratio |
|---|---|---|---|---|---|---|---|
| 1 | 13.5 | 17.5 | 1.30 | 45.9 | 3.41 | 77.5 | 5.76 |
| 8 | 54.9 | 97.2 | 1.77 | 163.8 | 2.99 | 181.6 | 3.31 |
| 32 | 140.7 | 209.9 | 1.49 | 201.4 | 1.43 | 209.7 | 1.49 |

The previous revision's run (copy 12.4 GB/s): batch 8 transformers 66.1, fp32 91.2, packed 159.6 (2.41x),
compiled 161.6 (2.44x); batch 32 134.2, 186.3, 199.8 (1.49x), 204.6 (1.52x). So at batch 8 tierserve gained
3-12% and transformers measured 17% lower in this run: against the earlier transformers figure the packed
batch 8 would be 2.48x. fp32 batch 1 streamed 9.4 GB/s, 75% of the copy bandwidth (72% and 96% in earlier
runs). Batch-1 decode only (benchmarks/decode_ab.py ``--decode-only``, same session): packed 42.7, compiled
67.1, llama.cpp 73.5 tok/s at two threads (0.91x); one thread 39.9, 62.7, 56.0 (1.12x). At batch 32 the
integer-dot kernel is compute-bound on AVX2 (benchmarks/q8_dot.py): profiled, its matmuls take ~63% of the
step time there, attention and its gathers ~15% before the C++ attention kernel.

With the batch-1 graph skipping dynamo's guards on the model's modules (models/decode_graph.py, Guards),
``benchmarks/decode_ab.py --decode-only --threads 2,1 --forms packed+compile --rounds 7`` (copy 9.2 / 6.5 GB/s;
results/decode_ab.json): compiled 90.2 vs llama.cpp 82.5 tok/s at two threads (1.09x), 62.6 vs 57.5 at one
(1.09x); the graph's own revisions side by side (``--revs``) 76.8 -> 97.0 tok/s, paired 1.13x. A full run of
this file in the same hour (copy 10.5 GB/s): fp32 batch 1 streamed 8.6 GB/s, 83% of the copy bandwidth;
``--forms fp32,fp32+compile`` of decode_ab.py: 12.2 and 14.4 tok/s x 540 MB = 71% and 84% of 9.2 GB/s.
Batch 32 swung from 135 to 241 tok/s (packed, compiled) between runs of one hour on this host; its
arithmetic bound: the integer-dot matmuls do 134M x 32 multiply-adds a step at ~60 GMAC/s (two cores, ~15
per cycle each, both integer-multiply pipes busy: benchmarks/q8_dot.py), ~70 ms, and decode attention
reads every sequence's fp32 K/V (~94 MB a step at the run's mean context of ~64 tokens) at ~10 GB/s, ~9 ms: with the 1024-token
prefill (~1.5 s) the run cannot finish under ~7 s, 290 tok/s, 2.1x a transformers run of 140 tok/s.

On another host (Intel Xeon, AVX512 with AVX-VNNI and AMX, 2 cores; copy 11.7 GB/s), after the eager CPU
row kernels (kernels/decoder_rows_cpu.py) and VNNI for Q8_0 (``--threads 2 --batches 8,32 --contexts 128
--repeats 2``): transformers 124.9 / 274.8 tok/s at batch 8 / 32, tierserve fp32 169.2 (1.35x) / 366.5 (1.33x),
packed 196.0 (1.57x) / 218.3 (0.79x), packed with ``compile_decode`` 171.6 / 209.0. transformers' fp32
matmuls use AVX512 here (2.3x and 2.0x its figures on the AVX2 host above), while the packed batches stay
bound by the Q4_1 integer dots (torch's int4 kernel is 1.05-1.15x faster than them at M=8 and 32 on this host,
benchmarks/q8_dot.py), so the batch ratios fall far short of 2.5x here. Batch 1 on the same host
(``decode_ab.py --decode-only --threads 2,1 --forms packed,packed+compile --rounds 7``, results/decode_ab.json):
the eager packed default 77.8 tok/s against llama.cpp's 79.1 at two threads (0.98x) and 65.7 against 53.4 at
one (1.23x); compiled 106.6 (1.35x) and 86.0 (1.61x). The eager default against the revision before the row
kernels, interleaved (``--revs``): 58.3 -> 82.2 tok/s median at two threads (paired 1.14x), 50.7 -> 64.8 at
one (1.28x).

Then with the 512-bit Q4_1 tile for batches (kernels/quant/q8_dot_cpu.cpp; same command, same host): batch 8
transformers 125.8, fp32 173.1 (1.38x), packed 262.2 (2.08x), compiled 234.2 (1.86x); batch 32 231.3, 373.9
(1.62x), 293.7 (1.27x), 274.4 (1.19x). Batch 1 (prompt included): packed 82.1 tok/s, compiled 112.4, llama.cpp
72.7 (1.13x and 1.55x).

Then with the AMX path of the integer-dot kernel (batches of 5 rows and more on the tile unit,
kernels/quant/q8_dot_amx.cpp) and the C++ argmax of greedy sampling (kernels/decoder_rows_cpu.py), same
host, ``--threads 2 --contexts 128 --repeats 3`` (copy 12.0 GB/s; results/decode.json), tok/s:

| batch | transformers fp32 | tierserve fp32 | ratio | packed (default) | ratio | packed, compile_decode | ratio |
|---|---|---|---|---|---|---|---|
| 1 | 25.5 | 24.7 | 0.97 | 84.0 | 3.29 | 118.8 | 4.66 |
| 8 | 100.3 | 152.9 | 1.52 | 358.4 | 3.57 | 328.2 | 3.27 |
| 32 | 245.0 | 350.3 | 1.43 | 692.0 | 2.82 | 665.1 | 2.71 |

(the run before it, batches 8 and 32 only: packed 369.6 / 712.0, 3.55x / 2.92x). The same command at the
revision before AMX, right before: packed 270.2 (2.58x) / 320.6 (1.26x); so AMX made batch 32 1.9-2.2x
faster end to end. fp32 batch 1 streamed 13.3 GB/s, 111% of the copy bandwidth (a copy reads and writes;
decode only reads). Batch 1 with its prompt: packed 84.7 tok/s, compiled 114.3, llama.cpp 73.6 (1.15x,
1.55x). Batch 1 decode only (``decode_ab.py --decode-only --threads 2,1 --forms packed,packed+compile
--rounds 7``; results/decode_ab.json): the eager default 91.6 tok/s against llama.cpp's 79.7 at two threads
(1.15x; copy 11.5 GB/s) and 62.4 against 47.7 at one (1.31x); compiled 123.6 (1.55x) and 74.8 (1.57x).
A batch-32 decode step (context ~50-70) then takes ~44 ms: the integer-dot matmuls ~20 ms (their weights
stream from memory: a pass over the 96 MB of packed weights measured 19.8 ms at 32 rows against 15.6 ms
from warm caches), decode attention over the fp32 pages ~8 ms (memory-bound: ~3 MB of K/V a layer), the
rest Python and small ops.

Usage: python benchmarks/decode.py [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.models.default_model import default_gguf_path, ensure_default_model  # noqa: E402

PROMPT_LEN = 32
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be on "
        "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
        "families, that he is considered the rightful property of some one or other of their daughters. ") * 8


def prompts(tok, batch: int) -> list[list[int]]:
    ids = tok.encode(TEXT)
    return [ids[i * 3: i * 3 + PROMPT_LEN] for i in range(batch)]


def memcopy_bandwidth() -> float:
    """GB/s of a large tensor copy, counting the bytes copied once (as the issue's 42 GB/s does)."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best / 1e9


def bench_hf(model, batch_prompts, new_tokens: int) -> float:
    x = torch.tensor(batch_prompts)
    with torch.inference_mode():
        model.generate(x[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t
    return len(batch_prompts) * new_tokens / dt


def bench_ours(llm, batch_prompts, new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([batch_prompts[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(batch_prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return len(batch_prompts) * new_tokens / dt


def bench_step_time(llm, context: int, steps: int = 16) -> float:
    """Median wall time of one decode step of one sequence at the given context length."""
    engine = llm.engine
    ids = [(i * 7919) % 40000 + 100 for i in range(context)]
    engine.add_request(ids, SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill (chunked over several steps if the budget is smaller)
    while engine.get_request(engine.request_ids()[0]).num_computed_tokens < context:
        engine.step()
    engine.step()
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    times = sorted(times[1:-1])
    return times[len(times) // 2]  # median: robust to other load on a shared machine


def bench_llama_cpp(new_tokens: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=default_gguf_path(), n_ctx=512, verbose=False, n_threads=torch.get_num_threads())
    t = time.perf_counter()
    out = llm("It is a truth universally acknowledged", max_tokens=new_tokens, temperature=0.0)
    n = out["usage"]["completion_tokens"]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; the best is kept")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="128,512,2048,4096")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder = ensure_default_model()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, num_blocks=1024, max_num_seqs=64, max_num_batched_tokens=2048)
    default = LLM(default_gguf_path(), quantization="auto", num_blocks=1024, max_num_seqs=64,
                  max_num_batched_tokens=2048)  # the embedded default on the CPU: the GGUF kept packed
    compiled = LLM(default_gguf_path(), quantization="auto", compile_decode=True, num_blocks=1024, max_num_seqs=64,
                   max_num_batched_tokens=2048)  # the same with --compile-decode
    result: dict = {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "throughput": []}
    print(f"SmolLM2-135M, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, prompt {PROMPT_LEN}; "
          f"transformers and tierserve fp32 on the same weights, tierserve packed = the default (Q4_1 GGUF)")
    print(f"{'batch':>6} {'transformers tok/s':>19} {'tierserve fp32':>15} {'ratio':>6} {'tierserve packed':>17} {'ratio':>6}"
          f" {'packed compiled':>16} {'ratio':>6}")
    for b in [int(x) for x in args.batches.split(",")]:
        ps = prompts(llm.tokenizer, b)
        # alternate the sides and keep each one's best run: this machine is shared and noisy
        ours = ref = packed = comp = 0.0
        for _ in range(args.repeats):
            ours = max(ours, bench_ours(llm, ps, args.new_tokens))
            ref = max(ref, bench_hf(hf, ps, args.new_tokens))
            packed = max(packed, bench_ours(default, ps, args.new_tokens))
            comp = max(comp, bench_ours(compiled, ps, args.new_tokens))  # the first run also compiles new shapes
        result["throughput"].append({"batch": b, "transformers": ref, "tierserve": ours, "ratio": ours / ref,
                                     "tierserve_packed": packed, "packed_ratio": packed / ref,
                                     "tierserve_packed_compiled": comp, "packed_compiled_ratio": comp / ref})
        print(f"{b:>6} {ref:>19.1f} {ours:>15.1f} {ours / ref:>6.2f} {packed:>17.1f} {packed / ref:>6.2f}"
              f" {comp:>16.1f} {comp / ref:>6.2f}")
    del hf, default, compiled
    print(f"\n{'context':>8} {'step ms':>8}")
    result["step_time"] = []
    for c in [int(x) for x in args.contexts.split(",")]:
        ms = bench_step_time(llm, c) * 1e3
        result["step_time"].append({"context": c, "ms": ms})
        print(f"{c:>8} {ms:>8.2f}")
    model = llm.engine.model
    # bytes a batch-1 decode step reads: every weight except the embedding table (only one row
    # of it is read) unless the LM head computes on the embedding table itself (tied, unpacked)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if model.logits_head.__class__.__name__ == "PackedLinear":
        weight_bytes -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    bw = memcopy_bandwidth()
    b1 = next((r["tierserve"] for r in result["throughput"] if r["batch"] == 1), None)
    if b1 is not None:
        achieved = weight_bytes * b1 / 1e9
        result["roofline"] = {"weight_bytes": weight_bytes, "memcopy_GBps": bw, "achieved_GBps": achieved,
                              "roofline_tok_s": bw / (weight_bytes / 1e9), "fraction": achieved / bw}
        print(f"\nweights {weight_bytes / 1e6:.0f} MB; memcopy {bw:.1f} GB/s -> roofline {bw * 1e9 / weight_bytes:.1f} "
              f"tok/s; batch-1 achieved {achieved:.1f} GB/s ({100 * achieved / bw:.0f}% of copy bandwidth)")
    del llm
    packed = LLM(default_gguf_path(), quantization="auto", num_blocks=256, max_num_seqs=8)  # the CPU default
    ps = prompts(packed.tokenizer, 1)
    pk = max(bench_ours(packed, ps, args.new_tokens) for _ in range(args.repeats))
    result["packed_b1"] = pk
    print(f"tierserve packed Q4_1 GGUF (the default) batch 1: {pk:.1f} tok/s")
    del packed
    compiled = LLM(default_gguf_path(), quantization="auto", compile_decode=True, num_blocks=256, max_num_seqs=8)
    pkc = max(bench_ours(compiled, ps, args.new_tokens) for _ in range(args.repeats))
    result["packed_compiled_b1"] = pkc
    print(f"tierserve packed Q4_1 GGUF, compile_decode batch 1: {pkc:.1f} tok/s ({pkc / pk:.2f}x eager)")
    del compiled
    lc = bench_llama_cpp(args.new_tokens)
    result["llama_cpp_b1"] = lc
    if lc:
        print(f"llama.cpp (Q4_1) batch 1: {lc:.1f} tok/s; tierserve packed / llama.cpp {pk / lc:.2f},"
              f" compiled / llama.cpp {pkc / lc:.2f}")
    else:
        print("llama.cpp (Q4_1) batch 1: llama_cpp not importable")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
