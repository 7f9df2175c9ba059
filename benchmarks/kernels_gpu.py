"""GPU time of each packed-weight linear (the triton kernels of ``kernels/gpu_linear.py``) against bf16 F.linear.

For Llama-3.2-1B's linear shapes (N x K: q/o 2048x2048, k/v 512x2048,
gate/up 8192x2048, down 2048x8192) and M = 1, 16, 128 bf16 activations:

- baseline: bf16 ``F.linear`` (cuBLAS) on a bf16 weight of the same shape;
- per format (q4_0, q4_1, q8_0, sinq 4-bit tile 64, mxfp4, nvfp4 W4A16,
  nvfp4 W4A4, dfloat11): the module ``accelerate_cuda`` swaps in.

Weights: random normal * 0.02. To keep the CPU-side quantization short, 256
rows are quantized and their packed rows repeated to N (every format stores
rows independently; the per-column/per-tensor parts are shared); DFloat11
codes the whole weight. Timing: each layer is copied C times so that the
copies together exceed 3x the GPU's L2 (every call streams its weight from
HBM), the C calls are captured in one CUDA graph (no CPU launch overhead; a
layer whose forward cannot be captured, e.g. NVFP4 W4A4's activation
quantization, which builds small tensors from Python, is timed eagerly and
marked), warmed up, and the graph is replayed ``--reps`` times between CUDA
events: the median / C is the time per call. GB/s = (packed weight bytes incl.
scales and tables + activation bytes + output bytes) / time. "x bf16" = bf16
time / format time (> 1: faster). The device-to-device copy bandwidth (read +
write of 1 GiB) is measured once and printed beside the table. Targets
reported, not asserted: Q4_0 and NVFP4 W4A16 at M = 1 at least 2.5x faster
than bf16.

Measured on one H200 (torch 2.11, triton 3.6; whole run 46 s; copy 2.7 TB/s):
every packed format is SLOWER than bf16 today. M = 1: q4_0 0.27-0.72x bf16
(8-45 us, 74-221 GB/s), nvfp4 0.14-0.50x, q8_0 0.26-0.71x, sinq 0.07-0.39x;
M = 16/128 FP4 is 0.02-0.15x, nvfp4 W4A4 1.5-2.7 ms (eager torch activation
quantization), dfloat11 66-446 us (the decode). The 2.5x target is not met:
the kernels issued one gather load per code byte and per scale (no vector
loads across ggml's 18-byte blocks). Since then the ggml formats' CUDA
modules split their blocks once into contiguous code and scale planes
(tierserve/kernels/quant/ggml_planes.py), so a tile's code bytes are one
contiguous run per row; not yet measured on a GPU (FP4 and SINQ unchanged).

Usage: python benchmarks/kernels_gpu.py [--reps 10] [--out DIR]; writes
DIR/kernels_gpu.json (default benchmarks/results). Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"q_o": (2048, 2048), "k_v": (512, 2048), "gate_up": (8192, 2048), "down": (2048, 8192)}
ROWS = (1, 16, 128)
FORMATS = {"q4_0": {}, "q4_1": {}, "q8_0": {}, "sinq": {}, "mxfp4": {}, "nvfp4": {},
           "nvfp4_w4a4": {"act_quant": True}, "dfloat11": {}}
BASE_ROWS = 256
L2_FACTOR = 3
MAX_COPIES = 128
TARGET_SPEEDUP = 2.5
EAGER = {"nvfp4_w4a4"}  # its activation quantization builds tensors from Python scalars: not capturable


def quantized_layer(name: str, n: int, k: int, g: torch.Generator):
    from tierserve.kernels.quant.base import PackedWeight, QuantizedLinear, get_format

    fmt = get_format(name.split("_w4a4")[0], **FORMATS[name])
    if name == "dfloat11":
        return QuantizedLinear(fmt, fmt.quantize((torch.randn(n, k, generator=g) * 0.02).bfloat16()), None)
    base = fmt.quantize(torch.randn(BASE_ROWS, k, generator=g) * 0.02)
    reps = n // BASE_ROWS
    tensors = {key: t.repeat(reps, 1) if t.dim() == 2 and t.shape[0] == BASE_ROWS else t
               for key, t in base.tensors.items()}
    return QuantizedLinear(fmt, PackedWeight(base.format, (n, k), tensors, base.meta), None)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name != "bias")


def time_calls(calls: list, reps: int, capture: bool = True) -> tuple[float, bool]:
    """Median seconds per call of ``calls`` (graph-captured when possible) and whether a graph was used."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph, run = None, None
    try:
        if not capture:
            raise RuntimeError("eager")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        graph = None

        def run():
            for c in calls:
                c()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times), graph is not None


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return max(2, min(MAX_COPIES, -(-L2_FACTOR * l2_bytes // max(nbytes, 1))))


def copy_bandwidth(reps: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _ = time_calls([lambda: dst.copy_(src)], reps)
    return 2 * src.numel() / t / 1e9


def bench_shape(shape: str, n: int, k: int, reps: int, l2: int, g: torch.Generator) -> list[dict]:
    from tierserve.kernels.gpu_linear import accelerate_cuda

    rows = []
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16().cuda()
    ws = [w.clone() for _ in range(copies_for(w.numel() * 2, l2))]
    layers = {}
    for name in FORMATS:
        model = torch.nn.Sequential(quantized_layer(name, n, k, g).cuda())
        accelerate_cuda(model)
        layers[name] = [model[0]] + [copy.deepcopy(model[0]) for _ in range(copies_for(module_bytes(model[0]), l2) - 1)]
    for m in ROWS:
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        io = (m * k + m * n) * 2
        t_bf16, _ = time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in ws], reps)
        rows.append({"shape": shape, "n": n, "k": k, "m": m, "format": "bf16", "us": t_bf16 * 1e6,
                     "gbps": (n * k * 2 + io) / t_bf16 / 1e9, "x_bf16": 1.0, "graph": True})
        for name, mods in layers.items():
            t, graphed = time_calls([lambda mod=mod: mod(x) for mod in mods], reps, name not in EAGER)
            rows.append({"shape": shape, "n": n, "k": k, "m": m, "format": name, "us": t * 1e6,
                         "gbps": (module_bytes(mods[0]) + io) / t / 1e9, "x_bf16": t_bf16 / t, "graph": graphed})
        del x
    return rows


def print_table(rows: list[dict], copy_gbps: float) -> None:
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    print(f"{'shape':8} {'N x K':>11} {'M':>4} {'format':11} {'us':>8} {'GB/s':>7} {'x bf16':>7}")
    for r in rows:
        flag = "" if r["graph"] else "  (eager)"
        print(f"{r['shape']:8} {r['n']:>5}x{r['k']:<5} {r['m']:>4} {r['format']:11} {r['us']:8.2f} "
              f"{r['gbps']:7.0f} {r['x_bf16']:7.2f}{flag}")
    for name in ("q4_0", "nvfp4"):
        got = [r["x_bf16"] for r in rows if r["format"] == name and r["m"] == 1]
        print(f"target {name} W4A16 at M=1 >= {TARGET_SPEEDUP}x bf16: min {min(got):.2f}x, "
              f"max {max(got):.2f}x over the 4 shapes")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is absent: the GPU kernels are not measured on this machine")
        return 0
    import tierserve.kernels.quant  # noqa: F401  (registers the formats)

    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    g = torch.Generator().manual_seed(0)
    copy_gbps = copy_bandwidth(args.reps)
    rows = []
    for shape, (n, k) in SHAPES.items():
        rows += bench_shape(shape, n, k, args.reps, l2, g)
        torch.cuda.empty_cache()
    print_table(rows, copy_gbps)
    print(f"total {time.time() - t0:.1f} s on {props.name}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_gpu.json"), "w") as f:
        json.dump({"device": props.name, "copy_gbps": copy_gbps, "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
