"""GPU worker with CPU expert hosts: decode tokens/s against all-resident and against the hardware bound.

Model: a random-weight Qwen3-30B-A3B-shaped MoE in bf16 (128 experts of
intermediate 768, top-8, hidden 2048) cut to ``--layers`` layers; its routing is
replayed from the real trace benchmarks/traces/smollm2_moe_austen.json
(tierserve/offload/routing_trace.py: the MoEfied SmolLM2 on *Emma*, mapped by
popularity rank onto 128 experts), so the run sees real skew and temporal
locality. The trace's counts are written as the usage file, so each residency
keeps the trace's hottest (layer, expert) pairs resident.

Runs: residency ``--residency`` (default 100, 50, 25, 10 % of the layers x 128
experts; 100 % is the engine without offload), each on a fresh engine on the
GPU with two plain-process expert hosts (``ProcessHostLauncher``, no Ray,
``--host-threads`` torch threads each) on this machine's CPU cores; batch
``--batches`` (1, 8): B prompts of ``--prompt-len`` random tokens, an untimed
warm-up round, then a round whose decode steps (after every request's first
token) are timed: tok/s = decode tokens / seconds.

Prefetch rows (``--prefetch-residency``, default 25 %): the same residency with a spare ring of
``--spare-slots`` slots, ``offload_prefetch`` none vs previous_step (tierserve/offload/prefetch.py), on
the same replayed routing: tok/s, its ratio to none, and the ring's counters (rows sent to hosts / computed
in slots, prefetches issued / used / wasted).

Hardware bound for the same split, summed over the timed steps (the routing
of each step is recorded as it runs): the GPU part reads the dense weights
(attention, routers, LM head), the KV of the batch and every resident expert
the step touches at the device's measured copy bandwidth; the cold part reads
the weights of every cold expert the step touches at the host's measured copy
bandwidth (numpy, 1 GiB, read + write per second, as the device figure):

    bound_s = sum_steps (dense + kv + resident_touched * E_bytes) / hbm_Bps + cold_touched * E_bytes / host_Bps

``x bound`` = measured seconds / bound seconds (target <= 1.25 at every
residency); ``% resident`` = tok/s / the 100 % row's at the same batch.

Usage: python benchmarks/offload_gpu.py --out DIR [--layers 2] [--residency 100,50,25,10] [--batches 1,8]
Without CUDA it exits 0 unless ``--device cpu`` (a smoke run of the script: ``--experts 16`` shrinks the
shape, and the figures speak of nothing).
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
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.offload.routing_trace import RoutingTrace, map_by_rank, record_routing, replay_routing  # noqa: E402
from tierserve.offload.usage import ExpertUsage  # noqa: E402
from tierserve.offload.usage_hook import routed_blocks  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402
from tierserve.tools.random_model import shape_config, word_tokenizer  # noqa: E402

TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "smollm2_moe_austen.json")


def save_model(out: str, layers: int, experts: int | None, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    cfg = shape_config("qwen3-30b-a3b", layers)
    if experts is not None:
        cfg.num_experts = experts
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    word_tokenizer(cfg.vocab_size).save_pretrained(out)
    del model
    return cfg


def dense_bytes(cfg, itemsize: int) -> int:
    """Per step: attention and router weights of every layer, the LM head (read whole)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + cfg.num_experts * h
    return itemsize * (cfg.num_hidden_layers * attn + cfg.vocab_size * h)


def run_batch(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int, vocab: int, cfg, itemsize: int,
              hbm: float, host: float) -> dict:
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    blocks = routed_blocks(engine.model)
    e_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize
    for timed in (False, True):
        for _ in range(batch):
            engine.add_request(torch.randint(0, vocab - 1, (prompt_len,), generator=gen).tolist(), params)
        started: set[str] = set()
        while len(started) < batch:
            started.update(o.request_id for o in engine.step())
        calls: list[list[tuple[int, int]]] = []
        trace, handle = record_routing(engine.model)
        sync(engine.device)
        t, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            marks = [len(rows) for rows in trace.layers]
            tokens += sum(len(o.new_token_ids) for o in engine.step())
            calls.append([(marks[j], len(trace.layers[j])) for j in range(len(blocks))])
        sync(engine.device)
        seconds = time.perf_counter() - t
        handle.detach()
    bound = 0.0
    context = prompt_len + new_tokens / 2
    kv = batch * context * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize * cfg.num_hidden_layers
    resident_n = cold_n = 0
    for step in calls:
        res = cold = 0
        for j, (lo, hi) in enumerate(step):
            keep = {int(e) for e in blocks[j].experts} if hasattr(blocks[j], "pool") else set(range(cfg.num_experts))
            touched = {e for row in trace.layers[j][lo:hi] for e in row}
            res += len(touched & keep)
            cold += len(touched - keep)
        resident_n, cold_n = resident_n + res, cold_n + cold
        bound += (dense_bytes(cfg, itemsize) + kv + res * e_bytes) / (hbm * 1e9) + cold * e_bytes / (host * 1e9)
    steps = max(1, len(calls))
    return dict(batch=batch, tok_s=tokens / seconds, bound_tok_s=tokens / bound, x_bound=seconds / bound,
                resident_experts_per_step=resident_n / steps, cold_experts_per_step=cold_n / steps)


def engine_for(folder: str, device: str, dtype: str, resident: int | None, usage: str, args, spare_slots: int = 0,
               prefetch: str = "none") -> LLMEngine:
    offload = OffloadConfig(resident_experts=resident, expert_hosts=2, timeout_s=120.0, usage_path=usage,
                            host_threads=args.host_threads, promotion_max_swaps=0, spare_slots=spare_slots,
                            prefetch=prefetch)
    max_b = max(int(b) for b in args.batches.split(","))
    blocks = max_b * (-(-(args.prompt_len + args.new_tokens) // 16) + 1) + 8
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype=dtype), device=device, offload=offload,
                                  cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
                                  scheduler=SchedulerConfig(max_num_seqs=max_b)))


def _add_arguments(ap) -> None:
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=None, help="shrink the shape's 128 experts (smoke runs)")
    ap.add_argument("--residency", default="100,50,25,10")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--host-threads", type=int, default=4)
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--prefetch-residency", default="25", help="residencies of the prefetch rows ('' : none)")
    ap.add_argument("--spare-slots", type=int, default=16, help="spare ring of the prefetch rows")


def main() -> int:
    run = parse_device_args("offload_gpu", __doc__, _add_arguments)
    if run is None:
        return 0
    args, device, hbm = run.args, run.device, run.copy_gbs
    host = host_bandwidth()
    print(f"device copy {hbm:.0f} GB/s, host copy {host:.1f} GB/s (read + write)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = save_model(tmp, args.layers, args.experts, torch.bfloat16, args.device)
        trace = map_by_rank(RoutingTrace.load(args.trace), cfg.num_experts, cfg.num_experts_per_tok, args.layers)
        usage = ExpertUsage(args.layers, cfg.num_experts)
        for j in range(args.layers):
            usage.record_counts(j, trace.counts(j))
        usage_file = os.path.join(tmp, "usage.json")
        usage.save(usage_file)
        base: dict[int, float] = {}
        for pct in (int(p) for p in args.residency.split(",")):
            resident = None if pct >= 100 else round(pct / 100 * args.layers * cfg.num_experts)
            t0 = time.perf_counter()
            engine = engine_for(tmp, args.device, "bfloat16", resident, usage_file, args)
            replay = replay_routing(engine.model, trace)
            build_s = time.perf_counter() - t0
            for b in (int(x) for x in args.batches.split(",")):
                r = run_batch(engine, b, args.prompt_len, args.new_tokens, cfg.vocab_size, cfg, 2, hbm, host)
                if pct >= 100:
                    base[b] = r["tok_s"]
                r.update(residency_pct=pct, pct_of_resident=100 * r["tok_s"] / base[b] if b in base else None,
                         engine_build_s=build_s)
                rows.append(r)
                print(_fmt(r), flush=True)
            replay.detach()
            engine.close()
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        prefetch_rows = run_prefetch_rows(tmp, trace, usage_file, cfg, hbm, host, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "offload_gpu.json"), "w") as f:
        json.dump(dict(device_copy_gbs=hbm, host_copy_gbs=host, layers=args.layers, rows=rows,
                       prefetch_rows=prefetch_rows), f, indent=1)
    return 0


def _ring_counters(engine: LLMEngine) -> dict:
    blocks, spare = engine.offload.blocks, engine.offload.spare
    return dict(remote_rows=sum(b.counters.remote_rows for b in blocks),
                spare_rows=sum(b.counters.spare_rows for b in blocks), fills=spare.fills, hits=spare.hits,
                issued=spare.prefetch.issued, used=spare.prefetch.used, wasted=spare.prefetch.wasted)


def run_prefetch_rows(folder: str, trace, usage_file: str, cfg, hbm: float, host: float, args) -> list[dict]:
    """Spare ring of ``--spare-slots`` at each ``--prefetch-residency``: prefetch none vs previous_step on the
    same replayed routing (each engine replays the trace from its start); the ring counters cover the warm-up
    and the timed round of each batch."""
    out: list[dict] = []
    pcts = [int(p) for p in args.prefetch_residency.split(",") if p.strip()]
    if pcts:
        print(f"prefetch rows: spare ring of {args.spare_slots} slots; device copy {hbm:.0f} GB/s, host copy "
              f"{host:.1f} GB/s")
    for pct in pcts:
        resident = round(pct / 100 * args.layers * cfg.num_experts)
        base: dict[int, float] = {}
        for policy in ("none", "previous_step"):
            engine = engine_for(folder, args.device, "bfloat16", resident, usage_file, args, args.spare_slots,
                                policy)
            replay = replay_routing(engine.model, trace)
            for b in (int(x) for x in args.batches.split(",")):
                before = _ring_counters(engine)
                r = run_batch(engine, b, args.prompt_len, args.new_tokens, cfg.vocab_size, cfg, 2, hbm, host)
                r.update({k: v - before[k] for k, v in _ring_counters(engine).items()})
                base.setdefault(b, r["tok_s"])
                r.update(residency_pct=pct, prefetch=policy, spare_slots=args.spare_slots,
                         x_of_no_prefetch=r["tok_s"] / base[b])
                out.append(r)
                print(f"residency {pct:3}% B={b:<2} prefetch {policy:<13} {r['tok_s']:8.1f} tok/s "
                      f"x{r['x_of_no_prefetch']:.2f} of none | rows remote {r['remote_rows']} spare "
                      f"{r['spare_rows']} | prefetch issued {r['issued']} used {r['used']} wasted {r['wasted']}",
                      flush=True)
            replay.detach()
            engine.close()
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return out


def _fmt(r: dict) -> str:
    pct = f"{r['pct_of_resident']:5.0f}%" if r["pct_of_resident"] is not None else "    -"
    return (f"residency {r['residency_pct']:3}% B={r['batch']:<2} {r['tok_s']:8.1f} tok/s | of all-resident {pct} "
            f"| bound {r['bound_tok_s']:8.1f} tok/s, x{r['x_bound']:.2f} of it | experts/step resident "
            f"{r['resident_experts_per_step']:.0f} cold {r['cold_experts_per_step']:.0f}")


if __name__ == "__main__":
    sys.exit(main())
