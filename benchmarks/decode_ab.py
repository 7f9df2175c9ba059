"""Batch-1 decode tokens/s of the embedded SmolLM2-135M: eager vs compiled, packed vs fp32, and llama.cpp.

Forms (each loaded once, then measured in alternation, A/B/A/B, since the
machine may be shared): ``packed`` (the GGUF kept packed, Q4_1 on torch's int4
kernel: the CPU default), ``packed+compile`` (the same with ``compile_decode``,
models/decode_compile.py), ``fp32`` (the fp32 conversion, oneDNN-packed
linears), ``fp32+compile``, and ``llama.cpp`` (llama_cpp on the same GGUF)
when ``llama_cpp`` is importable. Each run generates ``--new-tokens`` greedy
tokens (eos ignored) from a fixed 32-token prompt (``--decode-only``: only the steps after
the first generated token are timed, on every side); the table prints the median
tokens/s of ``--rounds`` runs per form and thread count, its ratio to
llama.cpp (or to the eager packed form without it), the compile seconds of the
compiled forms at load, the load average and the memory-copy bandwidth.
Writes benchmarks/results/decode_ab.json. llama.cpp: ``pip install .[bench]`` with the CMAKE_ARGS in
pyproject.toml; that build's prompt evaluation (any batch of 2+ tokens) took a constant ~7.6 s here, one thread,
while a one-token step took ~20 ms, so compare it with ``--decode-only``.

``--revs A,B``: the same forms across git revisions (``WORKTREE`` = the checkout with its
uncommitted edits), each revision's ``tierserve`` in its own process, loaded once and measured
in interleaved rounds (A B, B A, ...; benchmarks/ab_revisions.py); the table prints each
revision's median tok/s, its ratio to the first revision, and the median of the per-round
ratios (``paired``: each round's runs are adjacent in time). Writes decode_ab_revs.json.

Usage: python benchmarks/decode_ab.py [--threads 2,1] [--rounds 5] [--forms packed,packed+compile,fp32,fp32+compile]
       python benchmarks/decode_ab.py --revs HEAD~2,WORKTREE --forms packed --threads 2 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ab_revisions import SRC_ENV, Child, child_main, describe, interleaved  # noqa: E402  (benchmarks/)

# a child of --revs imports its revision's tierserve (ab_revisions.py)
sys.path.insert(0, os.environ.get(SRC_ENV) or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tierserve import LLM, SamplingParams  # noqa: E402
from tierserve.models.default_model import default_gguf_path, ensure_default_model  # noqa: E402

from decode import TEXT, memcopy_bandwidth  # noqa: E402  (benchmarks/decode.py)

PROMPT_LEN = 32


class TierserveForm:
    def __init__(self, form: str):
        compiled = form.endswith("+compile")
        t = time.perf_counter()
        if form.startswith("packed"):
            self.llm = LLM(default_gguf_path(), quantization="auto", compile_decode=compiled, num_blocks=64,
                           max_num_seqs=4)
        else:
            self.llm = LLM(ensure_default_model(), compile_decode=compiled, num_blocks=64, max_num_seqs=4)
        self.load_s = time.perf_counter() - t
        dec = self.llm.engine.model.__dict__.get("compiled_decode")
        self.compile_s = dec.compile_s if dec is not None else None
        self.prompt = self.llm.tokenizer.encode(TEXT)[:PROMPT_LEN]
        self.run(4)  # warm-up

    def run(self, new_tokens: int, decode_only: bool = False) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        if decode_only:
            return self._decode_steps(params, new_tokens)
        t = time.perf_counter()
        out = self.llm.generate([self.prompt], params)[0]
        dt = time.perf_counter() - t
        assert len(out.token_ids) == new_tokens
        return new_tokens / dt

    def _decode_steps(self, params: SamplingParams, new_tokens: int) -> float:
        """Tokens/s of the decode steps after the first generated token (prefill excluded)."""
        engine = self.llm.engine
        engine.add_request(list(self.prompt), params)
        rid = engine.request_ids()[-1]
        while not engine.get_request(rid).output_token_ids:
            engine.step()
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return (new_tokens - 1) / (time.perf_counter() - t)


class LlamaCppForm:
    load_s = compile_s = None

    def __init__(self):
        from llama_cpp import Llama

        self.Llama = Llama
        self.models: dict[int, object] = {}
        self.prompt = None

    def _model(self):
        n = torch.get_num_threads()
        if n not in self.models:
            self.models[n] = self.Llama(model_path=default_gguf_path(), n_ctx=512, n_threads=n, n_batch=64,
                                        verbose=False)
            if self.prompt is None:
                self.prompt = self.models[n].tokenize(TEXT.encode(), add_bos=False)[:PROMPT_LEN]
        return self.models[n]

    def run(self, new_tokens: int, decode_only: bool = False) -> float:
        llm = self._model()
        llm.reset()
        t = time.perf_counter()
        n = 0
        for tok in llm.generate(self.prompt, temp=0.0, reset=True):
            n += 1
            if n == 1 and decode_only:  # the prompt is evaluated and the first token sampled: start here
                t = time.perf_counter()
            if n == new_tokens:
                break
        return (n - 1 if decode_only else n) / (time.perf_counter() - t)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _child(args) -> None:
    """One form on this process's revision: load, then one run per ``run`` line (tok/s)."""
    torch.set_num_threads(int(args.threads))

    def setup():
        f = TierserveForm(args.forms)  # warmed up
        return f"load {f.load_s:.1f} s", lambda _cmd: f"{f.run(args.new_tokens, args.decode_only):.4f}"

    child_main(setup)


def main_revs(args) -> None:
    """--revs: each form on each revision in its own process, interleaved rounds (module docstring)."""
    revs, forms = args.revs.split(","), args.forms.split(",")
    result: dict = {"new_tokens": args.new_tokens, "rounds": args.rounds, "revs": {r: describe(r) for r in revs},
                    "runs": {}}
    for r in revs:
        print(f"{r}: {result['revs'][r]}")
    script = os.path.abspath(__file__)
    for threads in [int(x) for x in args.threads.split(",")]:
        for form in forms:
            sides = [Child(r, script, ["--child", "--forms", form, "--threads", str(threads),
                                       "--new-tokens", str(args.new_tokens)]
                           + (["--decode-only"] if args.decode_only else [])) for r in revs]
            try:
                bw, load0 = memcopy_bandwidth(), os.getloadavg()[0]
                runs: list[list[float]] = [[] for _ in sides]
                for order in interleaved(args.rounds, len(sides)):
                    for i in order:
                        runs[i].append(float(sides[i].ask("run")))
                load1, bw1 = os.getloadavg()[0], memcopy_bandwidth()
            finally:
                for c in sides:
                    c.close()
            med = [_median(v) for v in runs]
            # the same round's runs side by side: a load swing between rounds cancels in the ratio
            paired = [_median([a / b for a, b in zip(v, runs[0])]) for v in runs]
            result["runs"][f"{form}@{threads}"] = {"tok_s": dict(zip(revs, runs)), "median": dict(zip(revs, med)),
                                                   "paired_ratio": dict(zip(revs, paired)),
                                                   "memcopy_GBps": [bw, bw1], "loadavg": [load0, load1]}
            print(f"\n{form}, {threads} thread(s), batch 1, {args.new_tokens} new tokens, median of {args.rounds}"
                  f" interleaved rounds; memcopy {bw:.1f} -> {bw1:.1f} GB/s; load average {load0:.1f} -> {load1:.1f}")
            print(f"{'revision':<28} {'tok/s':>7} {'vs ' + revs[0]:>12} {'paired':>7}   runs")
            for r, c, m, p, v in zip(revs, sides, med, paired, runs):
                print(f"{r[:28]:<28} {m:>7.1f} {m / med[0]:>12.3f} {p:>7.3f}   " + " ".join(f"{x:.1f}" for x in v)
                      + f"   ({c.info})")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_ab_revs.json"), "w") as fh:
        json.dump(result, fh, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--forms", default="packed,packed+compile,fp32,fp32+compile")
    ap.add_argument("--revs", default=None, help="git revisions to compare (WORKTREE: the checkout), e.g. HEAD~1,"
                                                 "WORKTREE; each form runs in one process per revision")
    ap.add_argument("--decode-only", action="store_true", help="time only the decode steps after the first "
                                                                    "generated token, on every side")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if args.revs:
        return main_revs(args)
    forms = {name: TierserveForm(name) for name in args.forms.split(",")}
    if llama_cpp_available():
        forms["llama.cpp"] = LlamaCppForm()
    base = "llama.cpp" if "llama.cpp" in forms else next(iter(forms))
    result: dict = {"new_tokens": args.new_tokens, "rounds": args.rounds, "runs": {}, "load": {}}
    for name, f in forms.items():
        result["load"][name] = {"load_s": f.load_s, "compile_s": f.compile_s}
        if f.compile_s is not None:
            print(f"{name}: load {f.load_s:.1f} s, of which compile + warm-up {f.compile_s:.1f} s")
    for threads in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(threads)
        bw = memcopy_bandwidth()
        load0 = os.getloadavg()[0]
        for f in forms.values():  # warm-up at this thread count (a compiled form recompiles for it)
            f.run(4)
        runs: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):  # A/B/A/B: every form once per round
            for name, f in forms.items():
                runs[name].append(f.run(args.new_tokens, args.decode_only))
        load1 = os.getloadavg()[0]
        med = {name: _median(v) for name, v in runs.items()}
        result["runs"][threads] = {"tok_s": runs, "median": med, "memcopy_GBps": bw, "loadavg": [load0, load1]}
        print(f"\n{threads} thread(s), batch 1, {args.new_tokens} new tokens"
              f"{' (decode steps only, prefill excluded)' if args.decode_only else ''}, median of {args.rounds};"
              f" memcopy {bw:.1f} GB/s; load average {load0:.1f} -> {load1:.1f}")
        print(f"{'form':<16} {'tok/s':>7} {'vs ' + base:>14}   runs")
        for name, v in med.items():
            print(f"{name:<16} {v:>7.1f} {v / med[base]:>14.2f}   " + " ".join(f"{x:.0f}" for x in runs[name]))
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_ab.json"), "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
