"""Profile of one batch-1 decode step of the embedded SmolLM2-135M through the real engine.

For each weight form (fp32 folder; the GGUF kept packed with ``quantization="auto"``)
one sequence is prefilled through ``LLM``/``LLMEngine``, then ``--steps`` decode
steps run under ``torch.profiler`` (CPU activities). Printed per form:

- wall time per step (median over the profiled steps, measured outside the profiler
  too, since the profiler itself adds a few microseconds per op);
- time per op kind: the summed *self* CPU time of every dispatched op of that name
  per step (aten, mkldnn, custom ``ns::op``; the kernels), with call counts per step;
- kernel time (sum of op self times) against the step wall time: the rest is
  Python, module dispatch and engine bookkeeping (scheduler, sampler, detokenizer);
- time per decoder layer: wall time between a forward pre-hook and forward hook of
  each layer (median over steps), and the same for the LM head and the final norm.
  The compiled forms (``packed+compile``, ``fp32+compile``: models/decode_compile.py)
  do not call the layer modules, so only the LM head is timed there; their op table
  lists inductor's generated loops (``graph_N_cpp_fused_*``) as kernels.

- dtype casts and allocations per step: calls of ``aten::_to_copy`` (a real cast; ``aten::to``
  calls that return their input are not counted) and of ``aten::empty`` / ``aten::empty_strided``
  (a new tensor), with their summed self time.

The memory-copy bandwidth measured in the same run is printed beside the tables.
Writes benchmarks/results/decode_profile.json. ``--rev REV`` profiles the ``tierserve`` of a
git revision instead of the checkout (exported by ab_revisions.py; the process re-runs itself on it).

Usage: python benchmarks/decode_profile.py [--steps 32] [--threads 2] [--forms fp32,packed,packed+compile,fp32+compile]
       [--rev REV]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from ab_revisions import SRC_ENV, describe, export  # noqa: E402  (benchmarks/)

# --rev: this process re-runs itself with that revision's tierserve first on the path
sys.path.insert(0, os.environ.get(SRC_ENV) or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.models.default_model import default_gguf_path, ensure_default_model  # noqa: E402

from decode import memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


class LayerTimer:
    """Wall time of each named module's forward, from forward pre-hook to forward hook."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.times: dict[str, list[float]] = defaultdict(list)
        self._start: dict[str, float] = {}
        self.handles = []
        for name, mod in modules.items():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(_mod, _args):
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(_mod, _args, _out):
            self.times[name].append(time.perf_counter() - self._start.pop(name))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _start_sequence(llm: LLM, max_tokens: int) -> None:
    engine = llm.engine
    ids = llm.tokenizer.encode(PROMPT)
    engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    rid = engine.request_ids()[0]
    while engine.get_request(rid).num_computed_tokens < len(ids):
        engine.step()
    for _ in range(3):  # warm-up decode steps
        engine.step()


def profile_form(llm: LLM, steps: int) -> dict:
    engine = llm.engine
    # plain wall time per step, without the profiler (two sequences in turn: the first warms up)
    for _ in range(2):
        _start_sequence(llm, steps + 8)
        wall = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            wall.append(time.perf_counter() - t)
        while engine.has_unfinished():
            engine.step()

    # per-layer wall times (hooks only, no profiler)
    model = engine.model
    mods = {f"layer{i:02d}": layer for i, layer in enumerate(model.layers)}
    for name in ("norm", "logits_head"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            mods[name] = getattr(model, name)
    timer = LayerTimer(mods)
    _start_sequence(llm, steps + 8)
    timer.times.clear()
    fwd = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        fwd.append(time.perf_counter() - t)
    timer.remove()
    while engine.has_unfinished():
        engine.step()
    layers = {k: _median(v) for k, v in timer.times.items()}

    # op kinds under the profiler
    _start_sequence(llm, steps + 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        prof_wall = (time.perf_counter() - t) / steps
    while engine.has_unfinished():
        engine.step()
    ops = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if "::" not in ev.key and "cpp_fused" not in ev.key:  # user ranges hold Python time, not kernels;
            continue  # inductor's generated loops (compiled forms) are kernels: "graph_N_cpp_fused_..."
        ops[ev.key][0] += ev.self_cpu_time_total / 1e6 / steps
        ops[ev.key][1] += ev.count / steps
    kernel = sum(v[0] for v in ops.values())
    casts = ops.get("aten::_to_copy", [0.0, 0])
    allocs = [sum(ops.get(k, [0.0, 0])[j] for k in ("aten::empty", "aten::empty_strided")) for j in (0, 1)]
    return {"casts": [casts[1], casts[0] * 1e3], "allocations": [allocs[1], allocs[0] * 1e3],
            "step_ms": _median(wall) * 1e3, "profiled_step_ms": prof_wall * 1e3,
            "kernel_ms": kernel * 1e3, "overhead_ms": (prof_wall - kernel) * 1e3,
            "ops": sorted(([k, v[0] * 1e3, v[1]] for k, v in ops.items()), key=lambda r: -r[1]),
            "layers_ms": {k: v * 1e3 for k, v in layers.items()},
            "layers_sum_ms": sum(layers.values()) * 1e3, "hooked_step_ms": _median(fwd) * 1e3}


def print_form(name: str, r: dict, bw: float, top: int) -> None:
    print(f"\n== {name}: step {r['step_ms']:.2f} ms median ({1e3 / r['step_ms']:.1f} tok/s); memcopy {bw:.1f} GB/s")
    print(f"under profiler: step {r['profiled_step_ms']:.2f} ms = op kernels {r['kernel_ms']:.2f} ms"
          f" + Python/dispatch/engine {r['overhead_ms']:.2f} ms"
          f" ({100 * r['overhead_ms'] / r['profiled_step_ms']:.0f}%)")
    print(f"per step: {r['casts'][0]:.0f} dtype casts (aten::_to_copy, {r['casts'][1]:.3f} ms self),"
          f" {r['allocations'][0]:.0f} allocations (aten::empty/empty_strided, {r['allocations'][1]:.3f} ms self)")
    print(f"{'op (self time)':<34} {'ms/step':>8} {'calls/step':>10}")
    for op, ms, calls in r["ops"][:top]:
        print(f"{op:<34} {ms:>8.3f} {calls:>10.1f}")
    print(f"\n{'module (wall, hooks)':<22} {'ms':>7}   [memcopy {bw:.1f} GB/s]")
    for k, v in r["layers_ms"].items():
        print(f"{k:<22} {v:>7.3f}")
    print(f"{'sum of modules':<22} {r['layers_sum_ms']:>7.3f}  of a hooked step {r['hooked_step_ms']:.3f} ms"
          f" (rest: embedding, runner inputs, sampler, scheduler, detokenizer)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--forms", default="fp32,packed")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--tag", default="", help="suffix of the JSON file (e.g. before/after)")
    ap.add_argument("--rev", default=None, help="profile this git revision's tierserve (ab_revisions.py)")
    args = ap.parse_args()
    if args.rev and not os.environ.get(SRC_ENV):
        os.environ[SRC_ENV] = export(args.rev)
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    import tierserve
    print(f"tierserve from {os.path.dirname(tierserve.__file__)}"
          + (f" ({args.rev}: {describe(args.rev)})" if args.rev else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # compiled forms: name each generated loop
    bw = memcopy_bandwidth()
    print(f"SmolLM2-135M batch-1 decode profile, {torch.get_num_threads()} threads, {args.steps} steps;"
          f" memcopy {bw:.1f} GB/s")
    result = {"rev": args.rev, "threads": torch.get_num_threads(), "steps": args.steps, "memcopy_GBps_start": bw,
              "forms": {}}
    for form in args.forms.split(","):
        if form == "fp32":
            llm = LLM(ensure_default_model(), num_blocks=256, max_num_seqs=8)
        elif form == "packed":
            llm = LLM(default_gguf_path(), quantization="auto", num_blocks=256, max_num_seqs=8)
        elif form == "packed+compile":
            llm = LLM(default_gguf_path(), quantization="auto", compile_decode=True, num_blocks=256, max_num_seqs=8)
        elif form == "fp32+compile":
            llm = LLM(ensure_default_model(), compile_decode=True, num_blocks=256, max_num_seqs=8)
        else:
            raise SystemExit(f"unknown form {form!r}")
        r = profile_form(llm, args.steps)
        result["forms"][form] = r
        print_form(form, r, bw, args.top)
        del llm
    bw2 = memcopy_bandwidth()
    result["memcopy_GBps_end"] = bw2
    print(f"\nmemcopy at the end {bw2:.1f} GB/s")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "decode_profile" + (f"_{args.tag}" if args.tag else "") + ".json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
