"""Where a 4-bit KV format's error comes from: KL against plain KV with the error confined to one part.

Each held-out window (``--windows`` x ``--seq-len`` tokens of ``HELDOUT_NOVELS``) is prefilled once with
plain fp32 KV (the reference) and once per variant with plain pages whose ``write`` first passes K and/or V
through a codec round trip (quantize, dequantize): the page holds exactly what a compressed format would
give back, and the error sits only where the variant puts it. KL(P_plain || P_variant) is the mean over
positions 0..L-2 of every window, as in kv_formats_quality.py.

Variants (``--variants``; NAME[@LAYERS][+sinkN]):

- ``kv4`` / ``kv4_k`` / ``kv4_v``: kv4's codec (keys Hadamard-rotated over head_dim, asymmetric 4-bit per
  token and group of 32) on K and V / on K only / on V only;
- ``xq_BASIS[_rot][_alloc]`` (K and V) and ``xq_BASIS..._k`` / ``_v``: XQuant's latent (K before RoPE
  and V in an orthogonal basis; keys rotated back by the layer's RoPE table at their positions), with
  the latent coded by the same asymmetric 4-bit groups of 32. BASIS (per layer, ``W_k, W_v`` the
  projections, ``g_k`` the k-norm gain, ``s`` the input-norm gain): ``svd`` the SVD of ``W``; ``kg`` of
  ``diag(g_k) W_k`` (V: ``W_v``); ``kgs`` of ``diag(g_k) W_k diag(s)`` (V: ``W_v diag(s)``); ``kgsw``
  the latent of ``diag(w) K`` (``diag(w) V``) in the SVD basis of ``diag(w) diag(g_k) W_k diag(s)``
  (``diag(w) W_v diag(s)``), divided by w on read: w per key channel the RMS of the queries that multiply
  it (data-free: ``W_q diag(s)``'s row energies per head times the q-norm gain squared, summed over the
  heads sharing the KV head, averaged over each RoPE pair), per value channel the norm of the o_proj
  columns it feeds; RMS 1, floor 0.3. ``_rot``: a
  block Hadamard of the group size inside each latent group. ``_alloc``: per-group bits by greedy
  transform-coding allocation on the basis' mean squared singular value per group (each bit to the group
  whose ``S^2 4^-b`` is largest, 1..8 bits, the same total as 4 bits everywhere);
- ``@sliding`` / ``@global`` / ``@A-B``: only those layers quantized (the others keep plain KV);
- ``+sinkN``: positions < N of every window keep plain KV (the attention-sink tokens).

Measured (``--gemma --windows 2 --seq-len 512``, the default variants; Gemma-3-270m, 2 x 512 held-out tokens;
2-core CPU shared, copy bandwidth 14.2 GB/s, load average 2.2-4.4; results/kv_sensitivity_gemma.json):

| variant              | KL     | what it isolates                                         |
|----------------------|--------|----------------------------------------------------------|
| kv4                  | 0.2513 | kv4 on K and V                                           |
| kv4_k                | 0.2840 | kv4 on K only                                            |
| kv4_v                | 0.0289 | kv4 on V only                                            |
| kv4@sliding          | 0.1264 | kv4 on the sliding-window layers only                    |
| kv4@global           | 0.1636 | kv4 on the full-attention layers only                    |
| kv4+sink1            | 0.2522 | kv4, token 0 kept plain                                  |
| xq_svd               | 0.2733 | XQuant latent, basis of W_k (the codec before)           |
| xq_kg                | 0.0911 | basis of diag(g_k) W_k (k-norm gain folded)              |
| xq_kg_rot            | 0.0572 | + Hadamard inside each latent group (xquant.py now)      |
| xq_kg_alloc          | 0.0790 | fold + bits allocated by energy, no rotation             |
| xq_kg_rot_alloc      | 0.0812 | fold + rotation + allocation                             |
| xq_kgs_rot           | 0.0702 | input-norm gain folded too                               |
| xq_kgsw_rot          | 0.0505 | + channels weighted by query / o_proj energy             |
| xq_kg_rot_k          | 0.0345 | xquant.py's codec on K only                              |
| xq_kg_rot_v          | 0.0227 | ... on V only                                            |
| xq_kg_alloc_v        | 0.0342 | fold + allocation, V only                                |
| xq_kg_rot_alloc_v    | 0.0256 | fold + rotation + allocation, V only                     |
| xq_kg_rot@sliding    | 0.0313 | xquant.py's codec on the sliding-window layers only      |
| xq_kg_rot@global     | 0.0194 | ... on the full-attention layers only                    |
| xq_kg_rot+sink1      | 0.0444 | ... token 0 kept plain                                   |

Where Gemma's error comes from: the keys (kv4: 0.284 from K alone, 0.029 from V alone). The k norm's gain
is the cause for XQuant: the basis of ``W_k`` ignores it and is as bad as kv4 (0.273); folding it in cuts
the KL 3x (0.091), the in-group Hadamard another 1.6x (0.057, kept in xquant.py). Allocating bits by
singular-value energy helps only without the rotation (0.079) and hurts with it (0.081; on V 0.026 vs
0.023): not used. Folding the input norm's gain hurts (0.070); weighting channels by the query and o_proj
energies helps (0.050: not yet in xquant.py). Keeping token 0 plain helps XQuant (0.044) but not kv4
(0.252). Sliding and global layers both contribute; the global layers more for kv4. One KL over 2 windows:
differences under ~10% are within the spread between windows (single windows: kv4 0.228 / 0.275).

Per layer (``--gemma --windows 1 --layer-errors 3:64``; teacher-forced, every layer's input from the plain
prefill of the first window; ``layer_errors``; results/kv_sensitivity_layers_gemma.json): the normalised
input's step, the step seen by the layer's K and V projection (``kv_step``; ``h_kv_step`` for the
un-normalised stream), and the relative K / V errors of kv4 and of XQuant-CL's 3-bit deltas (g 64) chained
from layer 0:

| layer | step  | kv_step | h_kv_step | kv4 K | kv4 V | CL K  | CL V  |
|-------|-------|---------|-----------|-------|-------|-------|-------|
| 0     | -     | -       | -         | 0.077 | 0.097 | 0.091 | 0.138 |
| 1     | 1.285 | 2.627   | 0.651     | 0.078 | 0.096 | 0.692 | 0.671 |
| 2     | 0.784 | 4.558   | 0.881     | 0.069 | 0.095 | 0.543 | 1.856 |
| 3     | 0.191 | 0.615   | 0.592     | 0.079 | 0.088 | 0.278 | 0.426 |
| 4     | 0.372 | 0.866   | 0.699     | 0.075 | 0.086 | 0.314 | 0.816 |
| 5     | 0.233 | 0.808   | 0.794     | 0.079 | 0.085 | 0.137 | 0.343 |
| 6     | 0.880 | 2.149   | 1.343     | 0.067 | 0.082 | 0.354 | 0.828 |
| 7     | 0.288 | 0.908   | 0.956     | 0.075 | 0.085 | 0.142 | 0.244 |
| 8     | 0.475 | 0.856   | 0.638     | 0.076 | 0.087 | 0.170 | 0.301 |
| 9     | 0.126 | 0.688   | 0.679     | 0.076 | 0.081 | 0.097 | 0.188 |
| 10    | 0.164 | 0.502   | 0.465     | 0.075 | 0.091 | 0.088 | 0.173 |
| 11    | 0.214 | 0.795   | 0.724     | 0.080 | 0.085 | 0.108 | 0.262 |
| 12    | 0.396 | 0.469   | 0.478     | 0.079 | 0.084 | 0.234 | 0.328 |
| 13    | 0.376 | 0.475   | 0.417     | 0.078 | 0.085 | 0.196 | 0.268 |
| 14    | 0.295 | 0.465   | 0.414     | 0.076 | 0.085 | 0.149 | 0.251 |
| 15    | 0.190 | 0.343   | 0.341     | 0.074 | 0.085 | 0.094 | 0.148 |
| 16    | 0.218 | 0.360   | 0.341     | 0.077 | 0.086 | 0.086 | 0.169 |
| 17    | 0.194 | 0.638   | 0.463     | 0.078 | 0.081 | 0.221 | 0.245 |

In the first half of Gemma's layers a step, seen by K and V, is as large as what it moves (kv_step 0.62 ..
4.56): X-space deltas cost more than coding the layer afresh, and the chain's K / V errors there are
1.7-9x / 2.9-20x kv4's. Hence xquant_cl.py's rule (latents on the first half, deltas on the second; its
docstring, Layers). The un-normalised stream's step is smaller in the first half (0.59 .. 1.34) but its
deltas measured worse in the second (xquant_cl.py).

Usage: python benchmarks/kv_sensitivity.py [--gemma] [--windows 2] [--seq-len 512] [--variants kv4 kv4_k ...]
[--layer-errors BITS:GROUP ...]
Writes benchmarks/results/kv_sensitivity[_gemma].json (``--layer-errors``: kv_sensitivity_layers[_gemma].json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kv_sensitivity_variants import BLOCK, Probe  # noqa: E402  (benchmarks/)
from tierserve.cache.compress.xquant import apply_rope  # noqa: E402
from tierserve.engine.llm import build_engine_config  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.kernels.kv_pages import allocate_kv_cache  # noqa: E402
from tierserve.kernels.paged_attention import AttentionMetadata  # noqa: E402
from tierserve.models.context import ForwardContext  # noqa: E402
from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_sensitivity.json")


@torch.inference_mode()
def logprobs(model, caches, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.numel()
    blocks = -(-n // BLOCK)
    meta = AttentionMetadata.build([n], [n], [list(range(blocks))], BLOCK)
    hidden = model(tokens, torch.arange(n), ForwardContext(meta, caches))
    return torch.log_softmax(model.compute_logits(hidden[:-1]).float(), -1)


@torch.inference_mode()
def layer_errors(model, probe: Probe, tokens: torch.Tensor, cl_specs: list[str]) -> list[dict]:
    """Per attention layer, teacher-forced (every layer's input X from the plain-KV prefill): the relative
    error ``|K^ - K| / |K|`` and ``|V^ - V| / |V|`` (Frobenius over the window's tokens) of kv4 and of
    XQuant-CL at each ``BITS:GROUP`` with every layer a delta layer (xquant_cl.py's chain from layer 0; the
    format itself keeps the first half as latents), the normalised input's step ``|u_i - u_(i-1)| / |u_i|``,
    and the same step seen by layer i's K and V projection ``A_i = diag(s_i) [W_k; W_v]^T``:
    ``kv_step = |(u_i - u_(i-1)) A_i| / |u_i A_i + b_i|``; ``h_kv_step``: the same for the un-normalised
    residual stream h (the input norm's input), ``|((h_i - h_(i-1)) / rms(h_i)) A_i| / |u_i A_i + b_i|``."""
    from tierserve.cache.compress.base import build_compressor
    from tierserve.config import KVCompressionConfig

    n = tokens.numel()
    blocks = -(-n // BLOCK)
    inputs: dict[int, torch.Tensor] = {}
    streams: dict[int, torch.Tensor] = {}
    hooks = [ly.self_attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].float()))
             for i, ly in enumerate(model.layers)]
    hooks += [ly.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: streams.__setitem__(i, a[0].float()))
              for i, ly in enumerate(model.layers) if hasattr(ly, "input_layernorm")]
    logprobs(model, allocate_kv_cache(model.kv_spec(BLOCK), blocks), tokens[:n])
    for h in hooks:
        h.remove()
    pos, slots = torch.arange(n), torch.arange(n)
    chains = {}
    for spec in cl_specs:
        bits, group = (int(x) for x in spec.split(":"))
        comp = build_compressor(KVCompressionConfig("xquant_cl", latent_bits=bits, group_size=group),
                                model.kv_spec(BLOCK))
        comp.delta_layers = tuple(range(len(model.layers)))  # every layer a delta layer
        caches = comp.allocate_cache(blocks)
        comp.bind(model, caches)
        for h in comp._hooks:
            h.remove()
        chains[spec] = (caches, torch.zeros(n, model.cfg.hidden_size))

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    rows, u_prev = [], None
    for i in range(len(model.layers)):
        x = inputs[i]
        first = next(iter(chains.values()))[0][i] if chains else None
        gain = first.gain if first is not None else torch.ones(x.shape[-1])
        u = x / gain
        row = {"layer": i, "step": rel(u, u_prev) if u_prev is not None else None}
        if first is not None:
            kv_norm = torch.addmm(first.bias, u, first.proj).norm()
            row["kv_step"] = None if u_prev is None else float(((u - u_prev) @ first.proj).norm() / kv_norm)
            if i - 1 in streams:
                h, h_prev = streams[i], streams[i - 1]
                rms = h.pow(2).mean(-1, keepdim=True).sqrt()
                row["h_kv_step"] = float((((h - h_prev) / rms) @ first.proj).norm() / kv_norm)
            else:
                row["h_kv_step"] = None
        u_prev = u
        if first is not None:
            kv_exact = torch.addmm(first.bias, u, first.proj)
            k, v = kv_exact.split(first.heads * first.dim, dim=-1)
            if first.steps is not None:
                k, v = first.steps(k, v)
            cos, sin = probe.ropes[i].lookup(pos, torch.float32)
            k_rope = apply_rope(k.reshape(n, first.heads, first.dim), cos, sin)
            row["kv4_k"] = rel(probe.kv4_k(i, pos, k_rope), k_rope)
            row["kv4_v"] = rel(probe.kv4_v(i, pos, v.reshape(n, first.heads, first.dim)).reshape(n, -1), v)
            for spec, (caches, prev) in chains.items():
                kv = caches[i]
                prev = prev + kv.pages.write(slots, u - prev)
                chains[spec] = (caches, prev)
                kh, vh = torch.addmm(kv.bias, prev, kv.proj).split(kv.heads * kv.dim, dim=-1)
                if kv.steps is not None:
                    kh, vh = kv.steps(kh, vh)
                row[f"cl{spec}_k"], row[f"cl{spec}_v"] = rel(kh, k), rel(vh, v)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--variants", nargs="+", default=[
        "kv4", "kv4_k", "kv4_v", "kv4@sliding", "kv4@global", "kv4+sink1", "xq_svd", "xq_kg", "xq_kg_rot",
        "xq_kg_alloc", "xq_kg_rot_alloc", "xq_kgs_rot", "xq_kgsw_rot", "xq_kg_rot_k", "xq_kg_rot_v",
        "xq_kg_alloc_v", "xq_kg_rot_alloc_v", "xq_kg_rot@sliding", "xq_kg_rot@global", "xq_kg_rot+sink1"])
    p.add_argument("--gemma", action="store_true")
    p.add_argument("--layer-errors", nargs="*", default=None, metavar="BITS:GROUP",
                   help="instead of KL: per-layer relative K/V errors of kv4 and XQuant-CL (first window)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

    model = None
    if args.gemma:
        from tierserve.models.default_model import ensure_converted, gemma3_270m_gguf_path

        model = ensure_converted(gemma3_270m_gguf_path())
    engine = LLMEngine(build_engine_config(model, num_blocks=4, block_size=BLOCK, linear_backend="torch"))
    probe = Probe(engine.model)
    windows = austen_token_windows(engine.tokenizer, HELDOUT_NOVELS, args.windows, args.seq_len)
    blocks = -(-args.seq_len // BLOCK)
    if args.layer_errors is not None:
        rows = layer_errors(engine.model, probe, windows[0], args.layer_errors)
        keys = [k for k in rows[0] if k != "layer"]
        print("layer " + " ".join(f"{k:>9}" for k in keys))
        for r in rows:
            print(f"{r['layer']:>5} " + " ".join("        -" if r[k] is None else f"{r[k]:>9.4f}" for k in keys))
        out = args.out or RESULTS.replace(".json", "_layers_gemma.json" if args.gemma else "_layers.json")
        with open(out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
        return
    kl = {v: 0.0 for v in args.variants}
    secs = {v: 0.0 for v in args.variants}
    for w in windows:
        ref = logprobs(engine.model, allocate_kv_cache(engine.model.kv_spec(BLOCK), blocks), w)
        pref = ref.exp()
        for v in args.variants:
            t0 = time.perf_counter()
            lp = logprobs(engine.model, probe.caches(v, blocks), w)
            kl[v] += float((pref * (ref - lp)).sum())
            secs[v] += time.perf_counter() - t0
            print(f"  {v}: {kl[v]:.3f} (running sum)", flush=True)
    count = args.windows * (args.seq_len - 1)
    rows = [{"variant": v, "kl": kl[v] / count, "seconds": round(secs[v], 1)} for v in args.variants]
    print(f"\n{'variant':<28} {'KL':>9} {'s':>7}")
    for r in rows:
        print(f"{r['variant']:<28} {r['kl']:>9.4f} {r['seconds']:>7.1f}")
    bw, load = memcopy_bandwidth(), os.getloadavg()
    print(f"memory copy bandwidth {bw:.1f} GB/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out = args.out or RESULTS.replace(".json", "_gemma.json" if args.gemma else ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "copy_bandwidth_gbs": bw, "load_average": load, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
