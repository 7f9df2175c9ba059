"""Paged decode attention on CUDA: torch reference vs the triton kernels (plain bf16 pages and kv4 int4 pages).

Shape: a Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128), bf16,
block_size 16, pages shuffled over the pool; decode batch 1/8/32/128 with
every sequence at context 1k or 4k. Timed: the attend-only half of one
layer's decode step (``paged_decode``; the page write is the same call for
both and is left out), median of ``--reps`` calls after 3 warm-ups, with CUDA
events. "GB/s" counts the KV bytes the step must read once (``sum(seq_lens)
* Hkv * (K + V bytes per token per head)``: 2 * 128 * 2 for bf16, 2 * (64 +
4 * 128 / 32) for kv4) divided by the time; the H200's HBM reads at most
~4.8 TB/s. "ratio" = reference time / triton time. Every triton output is
checked against the reference (max |diff| printed). Without CUDA it prints
that and exits 0.

Measured on an H200 (torch 2.11, triton 3.6; ms, GB/s of KV read):

    batch ctx   torch         triton        ratio  triton kv4
    1     1k    0.144   29    0.125   34    1.2    0.185    7
    32    1k    0.161  836    0.108 1245    1.5    0.209  200
    128   1k    0.470 1141    0.235 2284    2.0    0.398  422
    1     4k    0.129  130    0.118  142    1.1    0.212   25
    32    4k    0.460 1167    0.192 2796    2.4    0.313  536
    128   4k    1.753 1225    0.674 3184    2.6    1.101  610

Small batches are launch-bound (~0.12 ms of host work per call for both);
large ones reach ~3.2 TB/s, two thirds of HBM. The kv4 kernel reads 3.2x
fewer bytes but is bound by the in-register dequantization (1.6x slower than
plain bf16 pages at batch 128, 4k).

Usage: python benchmarks/attention.py [--reps 20] [--out DIR]; writes DIR/attention.json
(default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HQ, HKV, DIM, BLOCK = 32, 8, 128, 16
BATCHES = (1, 8, 32, 128)
CONTEXTS = (1024, 4096)


def _time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _setup(batch: int, context: int):
    from tierserve.cache.compress.kv4 import PackedLayerKV, PackedTensor
    from tierserve.kernels.kv_pages import LayerKV
    from tierserve.kernels.paged_attention import AttentionMetadata
    from tierserve.kernels.quant.hadamard import hadamard_matrix

    per_seq = -(-context // BLOCK)
    ids = list(range(batch * per_seq))
    random.Random(0).shuffle(ids)
    tables = [ids[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK, "cuda")
    shape = (batch * per_seq, BLOCK, HKV, DIM)
    pages = LayerKV(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                    torch.randn(shape, device="cuda", dtype=torch.bfloat16))
    packed = PackedLayerKV(PackedTensor.empty(*shape, 32, "cuda"), PackedTensor.empty(*shape, 32, "cuda"), 32,
                           hadamard_matrix(DIM, torch.float32, "cuda"), torch.bfloat16)
    flat = torch.arange(shape[0] * BLOCK, device="cuda")
    for chunk in flat.split(1 << 18):  # quantize the same K/V into the int4 pages, in slices
        packed.write(chunk, pages.k.view(-1, HKV, DIM)[chunk], pages.v.view(-1, HKV, DIM)[chunk])
    q = torch.randn(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16)
    return q, pages, packed, meta


def run(reps: int) -> list[dict]:
    from tierserve.kernels.attention.paged_decode_triton import paged_decode as decode_triton
    from tierserve.kernels.paged_attention import paged_decode as decode_torch

    rows = []
    scale = DIM ** -0.5
    print(f"{'batch':>5} {'ctx':>5} {'torch ms':>9} {'GB/s':>7} {'triton ms':>9} {'GB/s':>7} {'ratio':>6} "
          f"{'max|d|':>8} {'kv4 ms':>8} {'GB/s':>7} {'kv4 max|d|':>10}")
    for context in CONTEXTS:
        for batch in BATCHES:
            q, pages, packed, meta = _setup(batch, context)
            tokens = batch * context
            plain_bytes = tokens * HKV * 2 * DIM * 2
            kv4_bytes = tokens * HKV * 2 * (DIM // 2 + 4 * DIM // 32)
            ref = decode_torch(q, pages, meta, scale)
            diff = (decode_triton(q, pages, meta, scale) - ref).abs().max().item()
            diff4 = (decode_triton(q, packed, meta, scale) - decode_torch(q, packed, meta, scale)).abs().max().item()
            t_ref = _time_ms(lambda: decode_torch(q, pages, meta, scale), reps)
            t_tri = _time_ms(lambda: decode_triton(q, pages, meta, scale), reps)
            t_kv4 = _time_ms(lambda: decode_triton(q, packed, meta, scale), reps)
            row = dict(batch=batch, context=context, torch_ms=t_ref, triton_ms=t_tri, kv4_ms=t_kv4,
                       torch_gbps=plain_bytes / t_ref / 1e6, triton_gbps=plain_bytes / t_tri / 1e6,
                       kv4_gbps=kv4_bytes / t_kv4 / 1e6, ratio=t_ref / t_tri, max_diff=diff, kv4_max_diff=diff4)
            rows.append(row)
            print(f"{batch:>5} {context:>5} {t_ref:>9.3f} {row['torch_gbps']:>7.0f} {t_tri:>9.3f} "
                  f"{row['triton_gbps']:>7.0f} {row['ratio']:>6.1f} {diff:>8.4f} {t_kv4:>8.3f} "
                  f"{row['kv4_gbps']:>7.0f} {diff4:>10.4f}", flush=True)
            del q, pages, packed, meta
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for attention.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is absent: the triton attention kernels are GPU-only (under TRITON_INTERPRET=1 their CPU "
              "times mean nothing); nothing to benchmark.")
        return 0
    print(f"{torch.cuda.get_device_name()}: Hq {HQ}, Hkv {HKV}, head_dim {DIM}, bf16, block_size {BLOCK}")
    rows = run(args.reps)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "shape": dict(hq=HQ, hkv=HKV, dim=DIM, block=BLOCK),
                   "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
