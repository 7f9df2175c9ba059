"""GPU decode throughput: tierserve vs transformers ``generate`` on the same GPU, against the HBM roofline.

Models: random-weight bf16 models of real shapes (tierserve/tools/random_model.py):
Llama-3.2-1B (16 layers) and Qwen3-30B-A3B cut to ``--moe-layers`` layers (the
per-layer figures are the real model's). Both engines load the same folder.

For each batch size B (default 1, 8, 32, 128): B prompts of ``--prompt-len``
random token ids, ``--new-tokens`` greedy tokens each, eos ignored.
- transformers: decode rate = B * (N - 1) / (t(generate N) - t(generate 1)),
  i.e. prefill excluded;
- tierserve: the engine's steps after the one that prefilled, timed alone
  (CUDA graphs as configured: on by default on CUDA);
- roofline: the HBM bound on decode, B / (bytes one step must read / measured
  copy bandwidth); bytes = every dense weight once (the LM head whole, of the
  input embedding only the batch's rows) + the experts a step touches
  (expected distinct experts of B * top_k uniform picks per layer) + the KV of
  the batch at its mean context. The copy bandwidth is measured here as bytes
  read + written per second by a device-to-device copy of 2 GiB.
- CUDA graphs vs eager at batch 1 (same engine, graphs switched off).

Usage: python benchmarks/decode_gpu.py --out DIR [--shapes llama-1b,qwen3-30b-a3b] [--batches 1,8,32,128]
On a machine without CUDA it says so and exits 0, unless ``--device cpu`` is given: then the same code runs
on the CPU (fp32 roofline from a host copy; use ``--layers 1`` and small batches: a smoke run of the script
itself, not a measurement the targets speak of).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402
from tierserve.tools.random_model import save_random_model, shape_config  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int = 2**31) -> float:
    """Bytes read + written per second (GB/s) of an ``nbytes`` copy on ``device``, best of 5."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best / 1e9


def step_bytes(cfg, batch: int, context: float, itemsize: int = 2) -> float:
    """Bytes one decode step must read: dense weights, touched experts, the batch's KV (``itemsize`` bytes)."""
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = h * head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    emb = vocab * h + batch * h  # the LM head is read whole; the input embedding only at the batch's token rows
    experts = getattr(cfg, "num_experts", None)
    if experts:
        k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        touched = experts * (1 - (1 - k / experts) ** batch)
        mlp = touched * 3 * h * inter + experts * h  # plus the router
    else:
        mlp = 3 * h * cfg.intermediate_size
    kv = batch * context * 2 * cfg.num_key_value_heads * head_dim
    return float(itemsize) * (layers * (attn + mlp) + emb + layers * kv)


def bench_hf(model, batch, prompt_len, new_tokens, vocab, device) -> float:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randint(0, vocab - 1, (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(x)

    def run(n):
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up
    t1, tn = run(1), run(new_tokens)
    return batch * (new_tokens - 1) / max(tn - t1, 1e-9)


def bench_ours(engine, batch, prompt_len, new_tokens, vocab) -> float:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # the first round warms up (triton compiles for new shapes); the second is timed
        for i in range(batch):
            engine.add_request(torch.randint(0, vocab - 1, (prompt_len,), generator=gen).tolist(), params)
        started: set[str] = set()
        while len(started) < batch:  # admission and prefill, not timed
            started.update(o.request_id for o in engine.step())
        sync(engine.device)
        t, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        sync(engine.device)
        dt = time.perf_counter() - t
    return tokens / dt


def engine_for(folder, max_batch, prompt_len, new_tokens, device: str, dtype: str) -> LLMEngine:
    blocks = max_batch * (-(-(prompt_len + new_tokens) // 16) + 1) + 8
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype=dtype), device=device,
                                  cache=CacheConfig(num_blocks=blocks),
                                  scheduler=SchedulerConfig(max_num_seqs=max_batch,
                                                            max_num_batched_tokens=max(2048, max_batch * prompt_len))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="llama-1b,qwen3-30b-a3b")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--moe-layers", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None, help="cut the dense shapes too (smoke runs)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default: bf16 on CUDA, else fp32")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("decode_gpu: CUDA is absent on this machine; nothing to measure")
        return 0
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth(device, 2**31 if device.type == "cuda" else 2**27)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; copy bandwidth {bw:.0f} GB/s (read + write)")
    rows = []
    for shape in args.shapes.split(","):
        layers = args.moe_layers if shape.startswith("qwen3") else args.layers
        cfg = shape_config(shape, layers)
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_random_model(shape, tmp, num_layers=layers, dtype=dtype, device=device.type)
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
            engine = engine_for(folder, max(batches), args.prompt_len, args.new_tokens, device.type,
                                str(dtype).removeprefix("torch."))
            graphs = engine.runner.graphs
            for batch in batches:
                ours = bench_ours(engine, batch, args.prompt_len, args.new_tokens, cfg.vocab_size)
                context = args.prompt_len + args.new_tokens / 2
                roof = batch / (step_bytes(cfg, batch, context, dtype.itemsize) / (bw * 1e9))
                hf = bench_hf(hf_model, batch, args.prompt_len, args.new_tokens, cfg.vocab_size, device)
                rows.append(dict(shape=shape, layers=cfg.num_hidden_layers, batch=batch, tierserve_tok_s=ours,
                                 hf_tok_s=hf, ratio_vs_hf=ours / hf, roofline_tok_s=roof,
                                 pct_roofline=100 * ours / roof, cuda_graphs=graphs is not None))
                print(_fmt(rows[-1]), flush=True)
            if graphs is not None:
                eager = _eager_batch1(engine, args, cfg)
                rows.append(dict(shape=shape, layers=cfg.num_hidden_layers, batch=1, tierserve_tok_s=eager,
                                 hf_tok_s=None, ratio_vs_hf=None, roofline_tok_s=None, pct_roofline=None,
                                 cuda_graphs=False))
                graph_rate = next(r["tierserve_tok_s"] for r in rows if r["shape"] == shape and r["batch"] == 1)
                print(f"{shape}: CUDA graphs vs eager at batch 1: {graph_rate:.0f} vs {eager:.0f} tok/s "
                      f"= {graph_rate / eager:.2f}x")
            engine.close()
            del engine, hf_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_gpu.json"), "w") as f:
        json.dump(dict(copy_bandwidth_gbs=bw, rows=rows), f, indent=1)
    return 0


def _eager_batch1(engine, args, cfg) -> float:
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        return bench_ours(engine, 1, args.prompt_len, args.new_tokens, cfg.vocab_size)
    finally:
        engine.runner.graphs = graphs


def _fmt(r) -> str:
    return (f"{r['shape']:>14} L={r['layers']:<3} B={r['batch']:<4} tierserve {r['tierserve_tok_s']:9.1f} tok/s | "
            f"transformers {r['hf_tok_s']:9.1f} | x{r['ratio_vs_hf']:.2f} | roofline {r['roofline_tok_s']:9.0f} "
            f"({r['pct_roofline']:.0f}%) | graphs {r['cuda_graphs']}")


if __name__ == "__main__":
    sys.exit(main())
