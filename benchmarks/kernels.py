"""CPU time of each weight format's packed matmul against fp32 F.linear and oneDNN PackedLinear.

For SmolLM2-135M's linear shapes (out x in: qkv 960x576, gate_up 3072x576,
down 576x1536; weights are random normal * 0.02, x random normal) and rows
M = 1, 8, 64, times ``fmt.linear(x, packed)`` exactly as the format runs it on
CPU (ggml blocks / sinq / dfloat11: dequantize then F.linear; FP4: the torch
reference path), ``F.linear`` on the fp32 weight and the engine's oneDNN
``PackedLinear`` (``tierserve/kernels/cpu_linear.py``). Best of ``--reps``
timed calls after 3 warm-up calls; ms and the ratio to fp32 F.linear.
dfloat11 runs on a bf16 weight with bf16 x. sigmascale (low-rank) is timed at
keep_ratio 0.5 with random calibration activations.

The triton kernels (``*_triton.py``) are GPU-only: under TRITON_INTERPRET=1
they run in a Python interpreter and their CPU times mean nothing, so they are
not timed here.

Usage: python benchmarks/kernels.py [--reps 20]; writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tierserve.kernels.quant  # noqa: E402,F401
from tierserve.kernels.cpu_linear import PackedLinear, onednn_available  # noqa: E402
from tierserve.kernels.quant.base import get_format  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json")
SHAPES = {"qkv 960x576": (960, 576), "gate_up 3072x576": (3072, 576), "down 576x1536": (576, 1536)}
ROWS = (1, 8, 64)
FORMATS = [
    ("q4_0", "q4_0", {}), ("q4_1", "q4_1", {}), ("q8_0", "q8_0", {}), ("sinq g64", "sinq", {"group": 64}),
    ("mxfp4", "mxfp4", {}), ("mxfp4 +had", "mxfp4", {"hadamard": True}), ("nvfp4", "nvfp4", {}),
    ("W4A4 mxfp4", "mxfp4", {"act_quant": True}), ("W4A4 nvfp4", "nvfp4", {"act_quant": True}),
    ("dfloat11 (bf16)", "dfloat11", {}), ("sigmascale keep0.5", "sigmascale", {"keep_ratio": 0.5, "steps": 0}),
]


def best_ms(fn, reps: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"torch threads {torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (HIGH load: timings noisy)" if load[0] > torch.get_num_threads() else ""))
    print("triton kernels are GPU-only; under TRITON_INTERPRET=1 they are not timing-meaningful, so only the "
          "CPU paths are timed.")
    print(f"best of {args.reps}, ms; ratio = time / fp32 F.linear time")
    rows = []
    for shape_name, (out, inp) in SHAPES.items():
        w = torch.randn(out, inp) * 0.02
        packed = {}
        for label, scheme, opts in FORMATS:
            try:
                fmt = get_format(scheme, **opts)
                src = w.to(torch.bfloat16) if scheme == "dfloat11" else w
                kw = {"activations": torch.randn(256, inp)} if scheme == "sigmascale" else {}
                packed[label] = (fmt, fmt.quantize(src, f"{shape_name}.weight", **kw), None)
            except Exception as exc:
                packed[label] = (None, None, f"{type(exc).__name__}: {exc}")
        lin = PackedLinear(w, None) if onednn_available() else None
        print(f"\n{shape_name}")
        print(f"{'format':<22}" + "".join(f"{'M=' + str(m) + ' ms':>12}{'ratio':>8}" for m in ROWS))
        base = {m: best_ms(lambda x=torch.randn(m, inp): torch.nn.functional.linear(x, w), args.reps) for m in ROWS}
        entries = [("fp32 F.linear", base)]
        if lin is not None:
            entries.append(("oneDNN PackedLinear", {m: best_ms(lambda x=torch.randn(m, inp): lin(x), args.reps)
                                                    for m in ROWS}))
        for label, (fmt, pk, err) in packed.items():
            if err is not None:
                entries.append((label, err))
                continue
            dt = torch.bfloat16 if fmt.name == "dfloat11" else torch.float32
            try:
                entries.append((label, {m: best_ms(lambda x=torch.randn(m, inp, dtype=dt): fmt.linear(x, pk),
                                                   args.reps) for m in ROWS}))
            except Exception as exc:
                entries.append((label, f"{type(exc).__name__}: {exc}"))
        for label, t in entries:
            if isinstance(t, str):
                print(f"{label:<22} FAILED: {t[:150]}")
                rows.append({"shape": shape_name, "format": label, "error": t})
                continue
            print(f"{label:<22}" + "".join(f"{t[m]:>12.3f}{t[m] / base[m]:>8.2f}" for m in ROWS), flush=True)
            for m in ROWS:
                rows.append({"shape": shape_name, "format": label, "M": m, "ms": t[m], "ratio_fp32": t[m] / base[m]})
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"load_average": load, "reps": args.reps, "rows": rows,
                   "note": "triton kernels GPU-only; not timed (TRITON_INTERPRET timings meaningless)"}, f, indent=1)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
