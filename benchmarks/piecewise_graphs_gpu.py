"""Decode of a MoE model, eager vs piecewise CUDA graphs (engine/piecewise_graphs.py), all-resident and offloaded.

Model: a random-weight Qwen3-MoE in bf16 with the Qwen3-30B-A3B layer shape (hidden 2048, 32/4 heads of 128,
top-8 of ``--experts`` experts of intermediate 768) cut to ``--layers`` layers and a ``--vocab`` vocabulary:
small enough that a decode step is bound by kernel launches and host work, which is what graphs remove.

Per residency (``--residency``, % of the layers x experts kept on the worker; 100 = no offload, otherwise the
cold experts live on two plain-process expert hosts, ``--host-threads`` torch threads each) and per batch
(``--batches``): B sequences of ``--prompt-len`` random tokens are prefilled, then ``--steps`` decode steps of
all B run through ``ModelRunner.execute`` (greedy argmax on the device, read back each step, as the engine
samples), first eagerly, then with the piecewise graphs installed (``capture=True`` on CUDA), both from the same
prefilled KV. One untimed warm-up round of 3 steps precedes each timed one. tok/s = B x steps / seconds (the
runner's forward, logits and argmax; no scheduler, sampler or detokenizer). ``x`` = piecewise / eager. The
greedy tokens of the two modes are compared and printed (equal in fp32; bf16 may flip a near-tie).

``--device cpu`` is a smoke run of the script: the piecewise segments run uncaptured (the CPU path of the tests),
so the figures say nothing about graphs; use a small shape (``--layers 2 --experts 8 --vocab 512``).
The device's and the host's copy bandwidth are printed beside the table.

Usage: python benchmarks/piecewise_graphs_gpu.py --out DIR [--layers 4] [--experts 16] [--batches 1,8]
Without CUDA (and without ``--device cpu``) it exits 0 and measures nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_gpu import sync  # noqa: E402
from gpu_setup import host_bandwidth, parse_device_args  # noqa: E402
from tierserve.engine.model_runner import ModelRunner  # noqa: E402
from tierserve.engine.piecewise_graphs import decode_graph_mode  # noqa: E402
from tierserve.engine.request import Request  # noqa: E402
from tierserve.kernels.attention.registry import build_attention_backend  # noqa: E402
from tierserve.kernels.cpu_linear import apply_linear_backend  # noqa: E402
from tierserve.models.loader import load_model  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402
from tierserve.step.schedule import ScheduledRequest, SchedulerOutput  # noqa: E402
from tierserve.tools.random_model import shape_config, word_tokenizer  # noqa: E402

BLOCK = 16


def save_model(out: str, args) -> None:
    from transformers import AutoModelForCausalLM

    cfg = shape_config("qwen3-30b-a3b", args.layers)
    cfg.num_experts, cfg.vocab_size = args.experts, args.vocab
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    word_tokenizer(cfg.vocab_size).save_pretrained(out)


def build(folder: str, residency: int, device: torch.device, launcher, args):
    """(model on ``device``, offload hook or None) with ``residency`` % of the experts on the worker."""
    model = load_model(folder, torch.bfloat16).model
    hook = None
    if residency < 100:
        from tierserve.offload.apply import apply_expert_offload, moe_blocks
        from tierserve.offload.placement import plan_placement

        counts = [[b.num_experts - e for e in range(b.num_experts)] for _, b in moe_blocks(model)]
        budget = round(residency / 100 * sum(len(r) for r in counts))
        hook = apply_expert_offload(model, plan_placement(counts, budget, 0), launcher.transports(),
                                    model_path=folder, device=str(device))
    model.to(device)
    apply_linear_backend(model, "auto")
    return model, hook


class Decoder:
    """B sequences prefilled into a runner with one scratch page, decoded step by step through ``execute``."""

    def __init__(self, model, batch: int, args, device: torch.device):
        per_seq = -(-(args.prompt_len + 2 * (args.steps + 3) + 1) // BLOCK)
        self.num_blocks = batch * per_seq
        attention = build_attention_backend("triton" if device.type == "cuda" else "torch")
        self.runner = ModelRunner(model, model.kv_spec(BLOCK), self.num_blocks + 1, batch, per_seq * BLOCK,
                                  device=device, attention=attention)
        gen = torch.Generator().manual_seed(batch)
        self.requests = {}
        for i in range(batch):
            prompt = torch.randint(0, args.vocab - 1, (args.prompt_len,), generator=gen).tolist()
            req = Request(f"r{i}", prompt, SamplingParams(), arrival=i)
            req.block_ids = list(range(i * per_seq, (i + 1) * per_seq))
            self.requests[req.request_id] = req
        self.max_len = per_seq * BLOCK
        self._step([ScheduledRequest(r.request_id, 0, r.num_tokens, tuple(r.block_ids), True)
                    for r in self.requests.values()])

    def _step(self, scheduled) -> None:
        out = self.runner.execute(SchedulerOutput(tuple(scheduled), (), len(scheduled)), self.requests)
        for rid, tok in zip(out.request_ids, out.logits.argmax(dim=-1).tolist()):
            self.requests[rid].append_output(tok)

    def decode(self, steps: int) -> float:
        """Seconds for ``steps`` decode steps of every sequence."""
        sync(self.runner.device)
        t = time.perf_counter()
        for _ in range(steps):
            self._step([ScheduledRequest(r.request_id, r.num_tokens - 1, 1, (), False)
                        for r in self.requests.values()])
        sync(self.runner.device)
        return time.perf_counter() - t

    def rewind(self, keep: int) -> None:
        """Drop the outputs after the first ``keep`` (their KV is simply rewritten by the next decode)."""
        for r in self.requests.values():
            del r.output_token_ids[keep:]


def measure(model, batch: int, args, device: torch.device) -> dict:
    dec = Decoder(model, batch, args, device)
    times, tokens = {}, {}
    for mode in ("eager", "piecewise"):
        if mode == "piecewise":
            t0 = time.perf_counter()
            dec.runner.install_decode_graphs("piecewise", dec.num_blocks, batch, dec.max_len,
                                             capture=device.type == "cuda")
            capture_s = time.perf_counter() - t0
        dec.rewind(1)
        dec.decode(3)  # warm-up
        dec.rewind(1)
        times[mode] = dec.decode(args.steps)
        tokens[mode] = [list(r.output_token_ids) for r in dec.requests.values()]
    n = batch * args.steps
    return dict(batch=batch, eager_tok_s=n / times["eager"], piecewise_tok_s=n / times["piecewise"],
                x=times["eager"] / times["piecewise"], tokens_equal=tokens["eager"] == tokens["piecewise"],
                capture_s=capture_s, segments=len(dec.runner.graphs.plan))


def _add_arguments(ap) -> None:
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--residency", default="100,50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--host-threads", type=int, default=4)


def main() -> int:
    run = parse_device_args("piecewise_graphs_gpu", __doc__, _add_arguments)
    if run is None:
        return 0
    args, device, dev_bw = run.args, run.device, run.copy_gbs
    host_bw = host_bandwidth(2**28)
    rows = []
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    launcher = None
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, args)
        for pct in (int(p) for p in args.residency.split(",")):
            if pct < 100 and launcher is None:
                launcher = ProcessHostLauncher()
                launcher.launch(2, HostSpec("auto", num_threads=args.host_threads, timeout_s=120.0))
            model, hook = build(tmp, pct, device, launcher, args)
            assert decode_graph_mode(model) == "piecewise", decode_graph_mode(model)
            for b in (int(x) for x in args.batches.split(",")):
                r = measure(model, b, args, device)
                r["residency_pct"] = pct
                rows.append(r)
            if hook is not None:
                hook.close()
            del model
    if launcher is not None:
        launcher.shutdown()
    print(f"piecewise vs eager decode, {args.layers} layers x {args.experts} experts (top-8), bf16, {device.type} "
          f"| device copy {dev_bw:.0f} GB/s, host copy {host_bw:.1f} GB/s (read + write)")
    print("resident  B   eager tok/s  piecewise tok/s      x  tokens equal  capture s")
    for r in rows:
        print(f"{r['residency_pct']:7}% {r['batch']:3} {r['eager_tok_s']:12.1f} {r['piecewise_tok_s']:16.1f} "
              f"{r['x']:6.2f}  {str(r['tokens_equal']):>12} {r['capture_s']:10.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "piecewise_graphs_gpu.json"), "w") as f:
        json.dump(dict(device=device.type, device_copy_gbs=dev_bw, host_copy_gbs=host_bw, layers=args.layers,
                       experts=args.experts, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
