"""The integer-dot CPU kernel (kernels/quant/q8_dot_cpu.py) against torch's int4 kernel, per SmolLM2 shape.

For each projection of SmolLM2-135M (qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536: Q4_1; the tied LM head 49152x576: Q8_0, which the int4 path runs
as two int4 terms) with random codes and scales, and each M in ``--rows``
activation rows: the median ms of ``--calls`` calls of

- ``int4``: ``_weight_int4pack_mm_for_cpu`` on the same-sized int4 pack, bf16
  casts included (int4_cpu.py; Q8_0 counts both terms);
- ``q8dot``: ``q8_dot_mm`` on the GGUF blocks (activation quantization included);

with their ratio, q8dot's weight bandwidth at M=1, and the per-token sum of
one batch-1 decode step (30 layers and the head). The copy bandwidth and the
load average are printed beside the table. Writes benchmarks/results/q8_dot.json.

Measured (AMD EPYC, AVX2 without AVX512, ``--threads 1`` pinned to one core while a
pruning job held the other; copy 8.9 GB/s, load 1.6), ms per call, int4 / q8dot:

| shape          | M=1                  | M=8                  | M=32                  |
|----------------|----------------------|----------------------|-----------------------|
| qkv 960x576    | 0.085 / 0.060 (1.43) | 0.226 / 0.200 (1.13) | 0.921 / 0.757 (1.22)  |
| o 576x576      | 0.055 / 0.043 (1.26) | 0.141 / 0.134 (1.05) | 0.538 / 0.480 (1.12)  |
| gate_up        | 0.256 / 0.141 (1.81) | 0.712 / 0.562 (1.27) | 2.909 / 2.228 (1.31)  |
| down           | 0.131 / 0.079 (1.66) | 0.369 / 0.318 (1.16) | 1.432 / 1.334 (1.07)  |
| head (Q8_0)    | 8.364 / 2.339 (3.58) | 24.30 / 8.268 (2.94) | 92.78 / 33.79 (2.75)  |

One batch-1 decode step's matmuls: int4 24.18 ms, q8dot 12.05 ms (2.01x). The
head gains most: the int4 path runs Q8_0 as two int4 terms (10 bits per weight
and two passes), q8dot reads the 8.5-bit blocks once at 12.9 GB/s. Repeated
runs on the shared host moved single entries by up to 40%.

After the kernel's second version (one (d, m) conversion and one 2-lane scale product per block, nibbles
by broadcast and per-lane shift, two accumulators, two Q4_1 rows per tile at M=1, 4 KiB prefetch; the .cpp
header), ``--threads 2``, nothing else running (copy 6.7 GB/s, load 1.15), ms per call, int4 / q8dot:

| shape          | M=1                   | M=8                   | M=32                   |
|----------------|-----------------------|-----------------------|------------------------|
| qkv 960x576    | 0.053 / 0.019 (2.87)  | 0.176 / 0.101 (1.74)  | 0.717 / 0.394 (1.82)   |
| o 576x576      | 0.036 / 0.013 (2.79)  | 0.126 / 0.063 (2.01)  | 0.440 / 0.238 (1.85)   |
| gate_up        | 0.153 / 0.057 (2.66)  | 0.619 / 0.304 (2.04)  | 2.597 / 1.265 (2.05)   |
| down           | 0.103 / 0.029 (3.62)  | 0.327 / 0.153 (2.14)  | 1.252 / 0.628 (1.99)   |
| head (Q8_0)    | 5.393 / 1.569 (3.44)  | 19.53 / 5.206 (3.75)  | 76.72 / 21.10 (3.64)   |

One batch-1 step's matmuls: int4 15.75 ms, q8dot 5.09 ms (3.09x; the first version: 9.2 ms at 2 threads).
The layer shapes now stream 16-19 GB/s from warm caches. One thread, the first and second version side by
side in one process (same shapes, median per call): M=1 1.4-1.6x faster, M=8 and 32 1.2-1.4x; a pass over
30 distinct layers' weights and the head (streamed from memory, as a decode step reads them) 13.8 -> 9.9 ms.
Batches stay compute-bound: per block and row pair two integer multiplies (maddubs, madd), a conversion and
an FMA; a 2-weight-row tile at M > 1 and a transposed scale layout measured no faster.

On an Intel Xeon with AVX512 and AVX-VNNI (2 cores; another host than the tables above), ``--threads 2
--calls 100``, the revision before VNNI and the VNNI build one after the other (ms per call, q8dot):

| shape        | M=1 before / VNNI | M=8           | M=32          |
|--------------|-------------------|---------------|---------------|
| head (Q8_0)  | 0.649 / 0.646     | 3.880 / 4.971 | 20.60 / 13.80 |

and a rerun of the revision before: 0.987, 5.116, 17.02 (the host moved ~15% between runs). The Q4_1 layer
shapes with ``vpdpbusd`` measured 0.70x of ``maddubs`` + ``madd`` at M=8 and 32 (qkv at M=32 0.456 vs 0.312
ms) and 0.7-0.8x at M=1, so only Q8_0 uses it (the .cpp header); with that build they match the revision
before within 3%. torch's int4 kernel, with AVX512 here, was then 1.05-1.15x faster than q8dot on the Q4_1
shapes at M=8 and 32, and 1.5-1.8x slower at M=1. With the 512-bit Q4_1 tile for batches (two blocks per
step; the .cpp header), the revision before and after it alternating twice (``--rows 8,32 --calls 100``), ms
per call before -> after:

| shape   | M=8                        | M=32                      |
|---------|----------------------------|---------------------------|
| qkv     | 0.084, 0.125 -> 0.075      | 0.451, 0.465 -> 0.299, 0.293 |
| o       | 0.079, 0.078 -> 0.047, 0.049 | 0.291, 0.293 -> 0.178   |
| gate_up | 0.431, 0.415 -> 0.228      | 1.628, 1.650 -> 0.902, 1.123 |
| down    | 0.210, 0.208 -> 0.109, 0.124 | 0.730, 0.839 -> 0.438, 0.499 |

(1.5-1.9x; the host ran ~40% slower in this hour than in the VNNI runs above.)

``--pass``: per M also one pass over 30 distinct layers' weights and the head (96 MB of blocks, so the
weights stream from memory as in a decode step; median of 7 passes). With the AMX path (batches of 5 rows
and more on the tile unit where the host has it, kernels/quant/q8_dot_amx.cpp), Xeon host, two threads, the
revision before and the AMX build one after the other, pass ms: 4 rows 9.7-11.0 (before) / 11.7 (AMX; so
AMX starts at 5 rows), 5 rows 11.9 / 12.3, 6 rows 13.5 / 11.2, 8 rows 16.5 / 11.6, 32 rows 62.4 / 19.8
(3.2x); per call from warm caches at M=32 (``--rows 1,4,8,32 --calls 50``): qkv 0.240 -> 0.066 ms, o 0.149
-> 0.047, gate_up 0.740 -> 0.164, down 0.360 -> 0.128, head 11.81 -> 2.82; M=8 1.4-2.0x; M=1 unchanged.
Without software prefetch of the next panel the AMX pass took 22.9 ms at 32 rows and 18.7 at 8: the tile
work and the weight stream did not overlap. Per block of 32 the tile unit's chain (zero, two loads, the
dot product, the store of C) bounds it: dropping the vector scaling of C changed the time by <10%.

Usage: python benchmarks/q8_dot.py [--threads 1] [--rows 1,8,32] [--calls 200] [--pass]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve.kernels.quant.int4_cpu import pack_int4  # noqa: E402
from tierserve.kernels.quant.q8_dot_cpu import KINDS, q8_dot_mm, simd, vnni  # noqa: E402

from call_timing import call_ms  # noqa: E402  (benchmarks/)
from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

SHAPES = {"qkv": (960, 576, "Q4_1", 30), "o": (576, 576, "Q4_1", 30), "gate_up": (3072, 576, "Q4_1", 30),
          "down": (576, 1536, "Q4_1", 30), "lm_head": (49152, 576, "Q8_0", 1)}


def random_blocks(n: int, k: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """GGUF ``kind`` blocks ``[N, K / 32 * bytes]`` with random codes and small fp16 scales (and mins)."""
    nb = k // 32
    d = (torch.rand(n, nb, generator=g) * 0.02 + 1e-3).half().view(torch.uint8).reshape(n, nb, 2)
    if kind == "Q4_1":
        m = (torch.randn(n, nb, generator=g) * 0.05).half().view(torch.uint8).reshape(n, nb, 2)
        return torch.cat((d, m, torch.randint(0, 256, (n, nb, 16), generator=g).to(torch.uint8)), -1).reshape(n, -1)
    qs = torch.randint(-127, 128, (n, nb, 32), generator=g).to(torch.int8).view(torch.uint8)
    return torch.cat((d, qs), -1).reshape(n, -1)


def pass_ms(m: int, g: torch.Generator, passes: int = 7) -> float:
    """Median ms of one pass of ``q8_dot_mm`` over 30 distinct layers' weights and the head at M = ``m``."""
    layers = [(random_blocks(n, k, kind, g), kind, torch.randn(m, k, generator=g))
              for n, k, kind, per_token in SHAPES.values() for _ in range(per_token)]
    times = []
    for _ in range(passes + 1):  # the first pass warms up
        t = time.perf_counter()
        for blocks, kind, x in layers:
            q8_dot_mm(x, blocks, kind)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--pass", dest="full_pass", action="store_true",
                    help="also a pass over 30 distinct layers and the head per M (weights from memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    print(f"{args.threads} thread(s), AVX2 kernel: {simd()}, VNNI: {vnni()}; memcopy {memcopy_bandwidth():.1f} GB/s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'shape':16s} {'M':>4s} {'int4 ms':>9s} {'q8dot ms':>9s} {'ratio':>6s} {'q8dot GB/s':>10s}")
    out, token = [], {"int4": 0.0, "q8dot": 0.0}
    for name, (n, k, kind, per_token) in SHAPES.items():
        blocks = random_blocks(n, k, kind, g)
        packed, sz = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g),
                               torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3,
                               torch.randn(n, k // 32, generator=g) * 0.05, 32)
        terms = 2 if kind == "Q8_0" else 1
        for m in rows:
            x = torch.randn(m, k, generator=g)
            calls = max(5, args.calls // m)
            t_int4 = terms * call_ms(lambda: mm(x.bfloat16(), packed, 32, sz).float(), calls)
            t_q8 = call_ms(lambda: q8_dot_mm(x, blocks, kind), calls)
            gbs = blocks.numel() / t_q8 / 1e6
            print(f"{name + ' ' + kind:16s} {m:4d} {t_int4:9.3f} {t_q8:9.3f} {t_int4 / t_q8:6.2f} {gbs:10.1f}",
                  flush=True)
            out.append({"shape": name, "kind": kind, "n": n, "k": k, "rows": m, "int4_ms": t_int4, "q8dot_ms": t_q8})
            if m == 1:
                token["int4"] += per_token * t_int4
                token["q8dot"] += per_token * t_q8
    if 1 in rows:
        print(f"one batch-1 decode step (30 layers + head): int4 {token['int4']:.2f} ms, q8dot {token['q8dot']:.2f} ms "
              f"({token['int4'] / token['q8dot']:.2f}x)")
    passes = {m: pass_ms(m, g) for m in rows} if args.full_pass else {}
    for m, ms in passes.items():
        print(f"pass over 30 layers + head, weights from memory, M={m}: q8dot {ms:.2f} ms", flush=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "q8_dot.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"threads": args.threads, "simd": simd(), "vnni": vnni(), "block_bytes": KINDS, "rows": out,
                   "token_ms": token, "pass_ms": passes}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
