"""Candidate CPU kernels for one batch-1 packed 4-bit linear (fp32 activations) on SmolLM2-135M's shapes.

For each projection shape of SmolLM2-135M (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536, LM head 49152x576; Q4_1-like weights, group 32, random codes and
scales) and one fp32 activation row, every path torch 2.13's CPU ops offer is timed
(the 10th-percentile of 300 calls: the machine is shared, the low tail is the
kernel) and its largest error against the float64 product of the same dequantized
weight is printed:

- ``int4_bf16``: ``_weight_int4pack_mm_for_cpu`` on bf16 activations, the two casts
  included (the kernel in ``kernels/quant/int4_cpu.py``);
- ``int4_fp32``: the same op on fp32 activations and fp32 scales (no casts);
- ``int4mm_packed``: ``quantized.int4mm_packed_weight_cpu``, fp32 activations;
- ``int8_blockdiag``: llama.cpp's Q8 activation scheme through ``torch._int_mm``: x
  quantized per 32-block to int8 (scale amax/127), laid out block-diagonally as a
  [K/32, K] int8 matrix (``_int_mm`` needs >= 17 rows), times int8 codes [K, N]
  (exact int32 block dots), then ``sum_g dx_g (d_gn S_gn + m_gn sum(q_x,g))``;
- ``int8_weight``: ``_weight_int8pack_mm`` (per-channel int8 weights, fp32 x; shown
  for speed only: it cannot hold per-group scales);
- ``dyn_quant_4bit``: ``_dyn_quant_pack_4bit_weight`` / ``_dyn_quant_matmul_4bit``
  (KleidiAI W4A8; on x86 its pack returns float32 bytes);
- ``fp32_onednn``: the dequantized fp32 weight, oneDNN-prepacked (``cpu_linear.py``),
  for scale: 8x the weight bytes.

The memory-copy bandwidth of the same run is printed beside the table. Writes
benchmarks/results/decode_int4_candidates.json.

Usage: python benchmarks/decode_int4_candidates.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from call_timing import call_ms  # noqa: E402  (benchmarks/)
from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
GROUP = 32


def candidates(n: int, k: int) -> dict:
    g = GROUP
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    d = torch.rand(n, k // g) * 0.01 + 1e-3
    m = -8 * d + torch.randn(n, k // g) * 1e-3
    w = (q.float().reshape(n, k // g, g) * d[..., None] + m[..., None]).reshape(n, k)
    x = torch.randn(1, k)
    ref = (x.double() @ w.double().t()).float()
    mm4 = torch.ops.aten._weight_int4pack_mm_for_cpu
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz32 = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).contiguous()
    szb = sz32.bfloat16()
    q8w = (q - 8).to(torch.int8).t().contiguous()  # codes - 8 in [-8, 7]: w = d (q8w) + (m + 8 d)
    zero = m + 8 * d

    def int8_blockdiag():
        xb = x.reshape(k // g, g)
        dx = xb.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        qx = torch.round(xb / dx).to(torch.int8)
        bd = torch.zeros(k // g, k // g, g, dtype=torch.int8)
        bd[torch.arange(k // g), torch.arange(k // g)] = qx
        s = torch._int_mm(bd.reshape(k // g, k), q8w).float()  # [G, N] exact block dots
        sx = qx.float().sum(-1, keepdim=True)  # [G, 1]
        return (dx * (d.t() * s + zero.t() * sx)).sum(0, keepdim=True)

    paths = {
        "int4_bf16": lambda: mm4(x.to(torch.bfloat16), packed, g, szb).float(),
        "int4_fp32": lambda: mm4(x, packed, g, sz32),
        "int4mm_packed": lambda: torch.ops.quantized.int4mm_packed_weight_cpu(x, packed, torch.tensor(g), sz32),
        "int8_blockdiag": int8_blockdiag,
    }
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    paths["int8_weight"] = lambda: torch.ops.aten._weight_int8pack_mm(x, w8, torch.rand(n))
    try:
        dq = torch.ops.aten._dyn_quant_pack_4bit_weight(q.to(torch.uint8), torch.stack([d, m], -1).flatten(),
                                                        None, g, k, n)
        paths["dyn_quant_4bit"] = lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, dq, g, k, n)
    except RuntimeError:
        pass
    wp = torch.ops.mkldnn._reorder_linear_weight(w, None)
    paths["fp32_onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
    slow = n * k > 10_000_000  # the scalar paths take ~60 ms on the LM head
    out = {}
    for name, fn in paths.items():
        try:
            err = (fn() - ref).abs().max().item() if name != "int8_weight" else float("nan")
            out[name] = {"ms": call_ms(fn, 20 if slow else 300, q=0.1, warmup=10), "max_abs_err": err}
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:80]}
    out["ref_max_abs"] = ref.abs().max().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = memcopy_bandwidth()
    print(f"batch-1 packed 4-bit linear candidates, {torch.get_num_threads()} threads; memcopy {bw:.1f} GB/s")
    result = {"threads": torch.get_num_threads(), "memcopy_GBps": bw, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        r = candidates(n, k)
        result["shapes"][name] = {"n": n, "k": k, **r}
        print(f"\n{name} {n}x{k} (max |y| {r['ref_max_abs']:.3g})  [memcopy {bw:.1f} GB/s]")
        print(f"{'path':<16} {'ms':>9} {'max |err|':>10}")
        for path, v in r.items():
            if path == "ref_max_abs":
                continue
            if "error" in v:
                print(f"{path:<16} {'-':>9} {v['error']}")
            else:
                print(f"{path:<16} {v['ms']:>9.4f} {v['max_abs_err']:>10.2e}")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_int4_candidates.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
