"""CPU time of each packed matmul (fast CPU path and torch reference path) against dense baselines.

For SmolLM2-135M's linear shapes (out x in: o_proj 576x576, qkv 960x576,
gate/up 1536x576, down 576x1536; weights random normal * 0.02 with one
outlier column, x random normal) and rows M = 1, 8, 64, in one process:

- baselines on the same weight: fp32 ``F.linear``, bf16 ``F.linear`` (bf16
  weight and x), and the engine's oneDNN-prepacked fp32 ``PackedLinear``
  (``tierserve/kernels/cpu_linear.py``);
- per format: the **fast** CPU path the engine uses (``kernels/quant/cpu_fast.py``:
  ``cpu_fast_module(QuantizedLinear)``; int4 kernels for q4_0/q4_1/sinq/mxfp4,
  row-chunked dequantization for q8_0/nvfp4, plus the MXFP4 LUT variant) and
  the **reference** path (``QuantizedLinear`` forward: dequantize the whole
  weight, then ``F.linear``; FP4: the torch reference). dfloat11 (bf16 x) and
  sigmascale (keep_ratio 0.5, low-rank factors) have no separate fast path.

Each entry is the median of ``--reps`` timed calls after 3 warm-up calls,
all variants of one (shape, M) timed round-robin so load drifts hit them
alike. "ratio" = time / fp32 F.linear time. "bytes/token" = bytes of weight
state the call reads per token at M=1, i.e. the resident weight bytes of
that form (fp32: 4 per weight, bf16: 2; packed: the fast module's
``nbytes``, or the format's ``PackedWeight.nbytes`` for the reference), with
"bits/w" the same per weight.

The triton kernels (``*_triton.py``) are GPU-only: under TRITON_INTERPRET=1
they run in a Python interpreter and their CPU times mean nothing, so they are
not timed here. The load average is printed: on a busy machine rerun. With
more runnable processes than cores, multi-threaded calls stall at their
thread barriers for whole scheduler slices (measured: a SmolLM2 decode step
1.9 s with 2 threads against 0.019 s with 1 at load average 8 on 2 cores), so
``--threads 1`` gives usable numbers there.

Usage: python benchmarks/kernels.py [--reps 30] [--shapes NAME ...] [--threads N];
writes benchmarks/results/kernels.json.
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

import tierserve.kernels.quant  # noqa: E402,F401
from tierserve.kernels.cpu_linear import PackedLinear, onednn_available  # noqa: E402
from tierserve.kernels.quant.base import QuantizedLinear, get_format  # noqa: E402
from tierserve.kernels.quant.cpu_fast import cpu_fast_module  # noqa: E402
from tierserve.kernels.quant.fp4_cpu import FP4LutLinear  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json")
SHAPES = {"o_proj 576x576": (576, 576), "qkv 960x576": (960, 576), "up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536)}
ROWS = (1, 8, 64)
FORMATS = [
    ("q4_0", "q4_0", {}), ("q4_1", "q4_1", {}), ("q8_0", "q8_0", {}), ("sinq g64", "sinq", {"group": 64}),
    ("mxfp4", "mxfp4", {}), ("mxfp4 +had", "mxfp4", {"hadamard": True}), ("nvfp4", "nvfp4", {}),
    ("W4A4 nvfp4", "nvfp4", {"act_quant": True}),
    ("dfloat11 (bf16)", "dfloat11", {}), ("sigmascale keep0.5", "sigmascale", {"keep_ratio": 0.5, "steps": 0}),
]


def _nbytes(module_or_packed) -> int:
    return int(module_or_packed.nbytes)


def build_variants(w: torch.Tensor, reps_note: list[str]) -> list[tuple[str, object, torch.dtype, int]]:
    """(label, callable module, x dtype, resident weight bytes) for every variant of one weight."""
    out, inp = w.shape
    variants = [("fp32 F.linear", lambda x: torch.nn.functional.linear(x, w), torch.float32, w.numel() * 4)]
    wb = w.bfloat16()
    variants.append(("bf16 F.linear", lambda x: torch.nn.functional.linear(x, wb), torch.bfloat16, w.numel() * 2))
    if onednn_available():
        variants.append(("oneDNN prepack fp32", PackedLinear(w, None), torch.float32, w.numel() * 4))
    for label, scheme, opts in FORMATS:
        fmt = get_format(scheme, **opts)
        src = w.bfloat16() if scheme == "dfloat11" else w
        kw = {"activations": torch.randn(256, inp)} if scheme == "sigmascale" else {}
        try:
            packed = fmt.quantize(src, f"{label}.weight", **kw)
        except Exception as exc:  # report, keep benchmarking the rest
            reps_note.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        ref = QuantizedLinear(fmt, packed)
        dt = torch.bfloat16 if scheme == "dfloat11" else torch.float32
        fast = cpu_fast_module(ref)
        if fast is not None:
            variants.append((f"{label} fast", fast, dt, _nbytes(fast)))
        if scheme == "mxfp4" and not opts:
            lut = FP4LutLinear(fmt, packed)
            variants.append((f"{label} LUT", lut, dt, _nbytes(lut)))
        variants.append((f"{label} ref", ref, dt, packed.nbytes))
    return variants


def time_round_robin(variants, inp: int, m: int, reps: int) -> dict[str, float]:
    xs = {label: torch.randn(m, inp).to(dt) for label, _, dt, _ in variants}
    times: dict[str, list[float]] = {label: [] for label, *_ in variants}
    with torch.inference_mode():
        for label, fn, _, _ in variants:
            for _ in range(3):
                fn(xs[label])
        for _ in range(reps):
            for label, fn, _, _ in variants:
                t = time.perf_counter()
                fn(xs[label])
                times[label].append(time.perf_counter() - t)
    return {label: statistics.median(ts) * 1e3 for label, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 is far steadier on a loaded machine")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"torch threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (HIGH load: timings noisy)" if load[0] > torch.get_num_threads() else ""))
    print("triton kernels are GPU-only (TRITON_INTERPRET timings are meaningless): CPU paths only.")
    print(f"median of {args.reps}, ms; ratio = time / fp32 F.linear; bytes = resident weight bytes read per token")
    rows, notes = [], []
    for shape_name in args.shapes:
        out, inp = SHAPES[shape_name]
        w = torch.randn(out, inp) * 0.02
        w[:, 5] *= 10
        variants = build_variants(w, notes)
        per_m = {m: time_round_robin(variants, inp, m, args.reps) for m in ROWS}
        base = {m: per_m[m]["fp32 F.linear"] for m in ROWS}
        print(f"\n{shape_name}")
        print(f"{'path':<24}" + "".join(f"{'M=' + str(m) + ' ms':>11}{'ratio':>7}" for m in ROWS)
              + f"{'bytes/token':>13}{'bits/w':>8}")
        for label, _, _, nbytes in variants:
            t = {m: per_m[m][label] for m in ROWS}
            bits = nbytes * 8 / (out * inp)
            print(f"{label:<24}" + "".join(f"{t[m]:>11.3f}{t[m] / base[m]:>7.2f}" for m in ROWS)
                  + f"{nbytes:>13,}{bits:>8.2f}", flush=True)
            for m in ROWS:
                rows.append({"shape": shape_name, "path": label, "M": m, "ms": t[m], "ratio_fp32": t[m] / base[m],
                             "bytes_per_token": nbytes, "bits_per_weight": bits})
    for n in notes:
        print("FAILED", n)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"load_average": load, "reps": args.reps, "threads": torch.get_num_threads(), "rows": rows,
                   "failed": notes, "note": "medians, round-robin timing; triton kernels GPU-only, not timed"},
                  f, indent=1)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
