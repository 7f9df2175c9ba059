"""Expert offload benchmark (issue 4): decode tokens/s, naive baseline, cold hits, bytes moved, REAP.

Setup: the MoEfied SmolLM2 (``ensure_moe_model``: 30 MoE layers x 8 experts, top-4;
``--random``: a random Mixtral of SmolLM2-135M's shape, 8 experts top-2) on a simulated
3-node ``ray.cluster_utils.Cluster`` (head: 2 CPUs, the worker; 2 nodes with the
``expert_host`` resource, one ExpertHost each). Every run builds a fresh ``LLMEngine``
(prefix caching off, promotions off: ``promotion_max_swaps=0``, so each placement stays
as planned), warms it up (one untimed batch-8 decode of ``WARMUP_TOKENS``: first-call
kernel set-up on the worker, and each host builds the modules of the experts it
computes on their first call, which would otherwise land in the batch-1 timing), and
decodes, on the same engine, first batch 1 (``PROMPTS[0]``) then batch 8
(8 concurrent greedy requests with the 8 different ``PROMPTS``), ``--tokens`` decode
tokens per request (``ignore_eos``). Timing starts once every request of the batch has
its first token (prefill excluded) and stops when all finish; tok/s = decode tokens of
the batch / that time. ``identical`` compares the tokens with the all-resident engine's
at the same batch size.

Cores: the simulated nodes share this machine's cores, so the benchmark gives each
"node" its own: the worker engine (this process) runs ``--worker-threads`` torch threads
(default 1) pinned to the first CPU (``os.sched_setaffinity``), the stand-in for the
device; the expert hosts (1 torch thread each) are pinned to the other CPUs, the
stand-in for other nodes' CPUs. The all-resident run is pinned the same way, so every
ratio compares the same worker with and without its experts. ``--no-pin`` leaves
placement to the OS: with ``--worker-threads 2`` the worker's OpenMP threads and both
hosts then contend for the same 2 cores and every remote call also pays a CPU hand-over
(the note of issue 4 gives that table too).

Runs (residency r = fraction of the 240 (layer, expert) pairs kept on the worker,
budget ``round(L * E * r)``):

* ``all-resident``: no offload (the 100% row and the reference of every ratio);
* ``calibrated`` at each ``--residency`` (default 0, 0.10, 0.25, 0.50; 0% runs with
  ``resident_experts=0``): fused dispatch (one message per host per layer), the
  placement from usage counts of a calibration pass (``--calib-windows`` x 256 tokens of
  the Austen calibration novels through the all-resident model, ``_calibrate``), no
  spare slots;
* at ``--compare-residency`` (default 0.25) also ``uniform`` (experts ranked by id,
  ``per_layer_floor = budget // layers`` so every layer keeps its lowest ids), and
  ``calibrated+cache`` (``--cache-slots`` spare slots, default 16; the engine measures
  its ``CostModel`` against a live host at start-up, the constants are printed);
* ``naive`` at ``--compare-residency``: uniform placement, no cache, and the
  per-expert dispatch of tierserve/offload/naive_dispatch.py (one blocking host call per
  (layer, cold expert with routed rows)) as plain Ray actor calls (numpy through Ray:
  what a first offload on Ray does), and ``naive(socket)``: the same per-expert calls
  over tierserve's socket channel (the fused path's channel), to separate what fusion
  gains from what the channel gains.

Per run and batch size, over the decode steps only (counters snapshotted after prefill):

* ``left wkr`` (the cold-hit rate): routed (token, slot) assignments whose expert
  ran on a host (``DispatchCounters.remote_rows``) / all routed assignments (the live
  usage counts); ``spare``: the fraction computed in a spare slot (``spare_rows``);
* ``act B/tok``: activation bytes sent to hosts (``HostPool.stats.bytes``) plus bytes
  received (``DispatchCounters.bytes_received``), per decoded token;
  ``wt B/tok``: expert weight bytes copied into spare slots per decoded token
  (``SpareSlots.fill_bytes.wire``: what crossed the wire, coded when the hosts keep
  DFloat11); ``msg/tok``: host messages per decoded token;
* ``pf left`` / ``pf spare``: the same two fractions over the prefill of the batch;
* long prefill (once per run, after the batch-1 decode): one ``LONG_PROMPT_TOKENS``-token
  held-out Austen prompt, its prefill seconds (and / all-resident), where its cold rows
  ran and the expert weight bytes copied into spare slots: the case the cost model
  sends to the ring (hundreds of rows per expert).

Ratios printed (the issue's target): at ``--compare-residency`` and batch 8, each fused
variant's tok/s / all-resident (target >= 0.70) and / naive (target >= 2.0; also / the
socket naive, for information).
Also: one ``ExpertHost.compute`` round trip (decode payloads of 1 and 4 rows) over a
plain Ray call and the socket channel, to one and both hosts. ``--reap``
(off by default): held-out Austen perplexity (``--reap-windows`` x 256 tokens of the
held-out novels) of the unpruned model and of REAP / frequency / random pruning at
ratios 0.25 and 0.5 (tierserve.tools.reap, one calibration of ``--calib-windows``
windows shared by REAP and frequency). ``--quick``: residencies 0 and 0.25, 4 tokens,
2 calibration windows, no round-trip table (a smoke run; numbers are not meaningful).
Writes benchmarks/results/offload.json (``--out``).

    python benchmarks/offload.py [--quick] [--tokens 32] [--residency 0 0.1 0.25 0.5] [--reap] [--random]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from offload_report import print_report  # noqa: E402
from offload_rtt import round_trip  # noqa: E402
from tierserve.actors.ray_launcher import RayHostLauncher  # noqa: E402
from tierserve.config import OffloadConfig  # noqa: E402
from tierserve.engine.llm import build_engine_config  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402

PROMPTS = (
    "Once upon a time, in a small village by the sea, there lived",
    "The three most important things to know about volcanoes are",
    "Write a short letter to a friend about your summer holiday:",
    "In the year 2150, the first city on Mars was built by",
    "The recipe for a good apple pie starts with",
    "Explain to a child why the sky is blue.",
    "The old lighthouse keeper had a secret that nobody",
    "Here is a list of tips for learning a new language:",
)
BATCHES = (1, 8)
WARMUP_TOKENS = 4
ALL_CPUS = frozenset(os.sched_getaffinity(0))
LONG_PROMPT_TOKENS = 448


@dataclasses.dataclass(frozen=True)
class Run:
    """One engine: its label, residency, placement ("uniform" | "calibrated"), spare slots, dispatch."""

    label: str
    residency: float
    placement: str = "calibrated"
    spare_slots: int = 0
    naive: bool = False
    channel: str = "socket"


# ------------------------------------------------------------------ models and calibration
def _random_moe(folder: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    from tierserve.models.default_model import ensure_default_model

    dense = ensure_default_model()
    cfg = MixtralConfig(hidden_size=576, intermediate_size=192, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(dense).save_pretrained(folder)
    return folder


def _calibrate(path: str, usage_file: str, windows: int, seq_len: int = 256) -> None:
    """Usage counts of the all-resident model over Austen calibration text, saved to ``usage_file``."""
    import torch
    from transformers import AutoTokenizer

    from tierserve.kernels.cpu_linear import apply_linear_backend
    from tierserve.models.loader import load_model
    from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows, forward_logits
    from tierserve.offload.usage import ExpertUsage
    from tierserve.offload.usage_hook import attach_usage_recorder, moe_blocks

    model = load_model(path).model
    apply_linear_backend(model, "auto")
    blocks = moe_blocks(model)
    usage = ExpertUsage(len(blocks), blocks[0].num_experts)
    attach_usage_recorder(model, usage)
    tokens = austen_token_windows(AutoTokenizer.from_pretrained(path), CALIBRATION_NOVELS, windows, seq_len)
    with torch.inference_mode():
        for i in range(0, windows, 2):
            forward_logits(model, tokens[i:i + 2])
    usage.save(usage_file)


# ------------------------------------------------------------------ decode runs
def _offload_config(run: Run, budget: int, layers: int, usage_file: str) -> OffloadConfig:
    floor = budget // layers if run.placement == "uniform" else 0
    return OffloadConfig(resident_experts=budget, expert_hosts=2, per_layer_floor=floor, usage_path=usage_file,
                         spare_slots=run.spare_slots, channel=run.channel, promotion_max_swaps=0)


def _snapshot(handle) -> dict:
    """Cumulative counters of an offloaded engine (module doc); zeros for all-resident."""
    if handle is None:
        return dict(routed=0, remote=0, spare=0, sent=0, received=0, messages=0, fill_bytes=0)
    return dict(routed=sum(sum(row) for row in handle.live.counts),
                remote=sum(b.counters.remote_rows for b in handle.blocks),
                spare=sum(b.counters.spare_rows for b in handle.blocks),
                sent=sum(handle.pool.stats.bytes.values()),
                received=sum(b.counters.bytes_received for b in handle.blocks),
                messages=sum(handle.pool.stats.messages.values()),
                fill_bytes=handle.spare.fill_bytes.wire if handle.spare is not None else 0)


def _decode_batch(engine: LLMEngine, batch: int, tokens: int) -> dict:
    """Run ``batch`` concurrent greedy requests; decode tok/s, tokens per request, counter deltas."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    rids = [engine.add_request(PROMPTS[i], params) for i in range(batch)]
    out: dict[str, list[int]] = {r: [] for r in rids}
    start = _snapshot(engine.offload)
    while any(not out[r] for r in rids):  # prefill: until every request has its first token
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    before = _snapshot(engine.offload)
    prefill = {k: before[k] - start[k] for k in before}
    decoded = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
            decoded += len(o.new_token_ids)
    dt = time.perf_counter() - t0
    after = _snapshot(engine.offload)
    delta = {k: after[k] - before[k] for k in after}
    routed = max(1, delta["routed"])
    return dict(tok_s=decoded / dt, decoded=decoded, tokens=[out[r] for r in rids],
                left_worker=delta["remote"] / routed, spare=delta["spare"] / routed,
                act_bytes_per_tok=(delta["sent"] + delta["received"]) / max(1, decoded),
                weight_bytes_per_tok=delta["fill_bytes"] / max(1, decoded),
                messages_per_tok=delta["messages"] / max(1, decoded),
                prefill_left_worker=prefill["remote"] / max(1, prefill["routed"]),
                prefill_spare=prefill["spare"] / max(1, prefill["routed"]),
                prefill_weight_bytes=prefill["fill_bytes"])


def _long_prefill(engine: LLMEngine, path: str) -> dict:
    """Prefill of one ``LONG_PROMPT_TOKENS``-token held-out Austen prompt: seconds, where its cold rows ran."""
    from transformers import AutoTokenizer

    from tierserve.tools.calibration import HELDOUT_NOVELS, austen_token_windows

    prompt = austen_token_windows(AutoTokenizer.from_pretrained(path), HELDOUT_NOVELS, 1, LONG_PROMPT_TOKENS)
    before = _snapshot(engine.offload)
    t0 = time.perf_counter()
    engine.add_request(prompt[0].tolist(), SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    after = _snapshot(engine.offload)
    d = {k: after[k] - before[k] for k in after}
    routed = max(1, d["routed"])
    return dict(long_prefill_s=dt, long_prefill_left=d["remote"] / routed, long_prefill_spare=d["spare"] / routed,
                long_prefill_weight_bytes=d["fill_bytes"])


def _pin(engine: LLMEngine) -> None:
    """This process (the worker) on the first CPU, the engine's expert hosts on the others (module doc)."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    if engine.offload is not None:
        for transport in engine.offload.pool.transports.values():
            os.sched_setaffinity(transport.stats().pid, set(cpus[1:]))


def _engine_run(path: str, run: Run | None, budget: int, layers: int, usage_file: str, tokens: int,
                threads: int, pin: bool) -> dict:
    """One engine (None: all-resident), warm-up, then batch 1 and batch 8; a row per batch size."""
    from tierserve.offload.naive_dispatch import use_naive_dispatch

    config = build_engine_config(path, num_blocks=128, max_num_seqs=max(BATCHES), max_model_len=512,
                                 enable_prefix_caching=False, num_threads=threads)
    if run is not None:
        config = dataclasses.replace(config, offload=_offload_config(run, budget, layers, usage_file))
    engine = LLMEngine(config, host_launcher=RayHostLauncher())  # the hosts: ExpertHost actors on the cluster
    try:
        if pin:
            _pin(engine)
        if run is not None and run.naive:
            use_naive_dispatch(engine.offload)
        cost = dataclasses.asdict(engine.offload.blocks[0].cost) if run is not None and run.spare_slots else None
        _decode_batch(engine, max(BATCHES), WARMUP_TOKENS)
        frac = 1.0 if engine.offload is None else engine.offload.placement.fraction_resident
        res = {b: dict(fraction_resident=frac, cost_model=cost, **_decode_batch(engine, b, tokens)) for b in BATCHES}
        res[BATCHES[0]].update(_long_prefill(engine, path))
        return res
    finally:
        engine.close()
        if pin:
            os.sched_setaffinity(0, ALL_CPUS)


def _runs(args) -> list[Run]:
    runs = [Run("calibrated", r) for r in args.residency]
    c = args.compare_residency
    runs += [Run("uniform", c, "uniform"), Run("calibrated+cache", c, spare_slots=args.cache_slots),
             Run("naive", c, "uniform", naive=True, channel="ray"),
             Run("naive(socket)", c, "uniform", naive=True, channel="socket")]
    return runs


def _decode_table(path: str, layers: int, experts: int, calib_file: str, args) -> list[dict]:
    ref = _engine_run(path, None, 0, layers, "", args.tokens, args.worker_threads, args.pin)
    rows = [dict(label="all-resident", residency=1.0, batch=b, identical=True, **ref[b]) for b in BATCHES]
    usage_dir = os.path.dirname(calib_file)
    for i, run in enumerate(_runs(args)):
        # a fresh usage file per run (the engine saves its live counts back on close); uniform: none (ids)
        run_file = os.path.join(usage_dir, f"run{i}.json")
        if run.placement == "calibrated":
            shutil.copy(calib_file, run_file)
        t0 = time.perf_counter()
        res = _engine_run(path, run, round(layers * experts * run.residency), layers, run_file, args.tokens,
                          args.worker_threads, args.pin)
        for b in BATCHES:
            rows.append(dict(label=run.label, residency=run.residency, batch=b,
                             identical=res[b]["tokens"] == ref[b]["tokens"], **res[b]))
        print(f"  {run.label} @ {run.residency:.2f}: {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: residencies 0 and 0.25, 4 tokens")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--residency", type=float, nargs="+", default=[0.0, 0.10, 0.25, 0.50])
    ap.add_argument("--compare-residency", type=float, default=0.25)
    ap.add_argument("--cache-slots", type=int, default=16)
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads of the worker engine (module doc)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the worker and the hosts to separate CPUs (module doc)")
    ap.add_argument("--reap", action="store_true", help="also the REAP/frequency/random perplexity table")
    ap.add_argument("--reap-windows", type=int, default=8, help="held-out windows of 256 tokens for --reap")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "offload.json"))
    args = ap.parse_args(argv)
    if args.pin and len(ALL_CPUS) < 2:
        ap.error("pinning needs at least 2 CPUs (one for the worker, the rest for the hosts); pass --no-pin")
    if args.quick:
        args.residency, args.tokens, args.calib_windows, args.reap_windows = [0.0, 0.25], 4, 2, 2
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.random:
        path = _random_moe(tempfile.mkdtemp(prefix="moe-rand-"))
    else:
        from tierserve.tools.moefy import ensure_moe_model

        path = ensure_moe_model()
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    layers, experts = hf["num_hidden_layers"], hf.get("num_local_experts") or hf.get("num_experts")
    usage_dir = tempfile.mkdtemp(prefix="moe-usage-")
    calib_file = os.path.join(usage_dir, "calibration.json")
    t0 = time.perf_counter()
    _calibrate(path, calib_file, args.calib_windows)
    print(f"calibration: {args.calib_windows} x 256 Austen tokens in {time.perf_counter() - t0:.1f}s", flush=True)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=200 * 2**20))
    for _ in range(2):
        cluster.add_node(num_cpus=0, resources={"expert_host": 1}, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        rows = _decode_table(path, layers, experts, calib_file, args)
        rtt = {} if args.quick else round_trip(hf["hidden_size"], 4)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(usage_dir, ignore_errors=True)
    if args.reap:
        from offload_reap import reap_table

        reap = reap_table(path, args.calib_windows, args.reap_windows)
    else:
        reap = []
    print(f"model: {path} ({layers} MoE layers x {experts} experts, top-{hf['num_experts_per_tok']}); "
          f"{args.tokens} decode tokens per request, worker threads {args.worker_threads}, "
          f"{'worker and hosts pinned to separate CPUs' if args.pin else 'not pinned'}")
    ratios = print_report(rows, args.compare_residency, rtt, reap, BATCHES, LONG_PROMPT_TOKENS)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=path, tokens=args.tokens, worker_threads=args.worker_threads, pinned=args.pin, quick=args.quick, rows=rows,
                       ratios=ratios, round_trip=rtt,
                       reap=reap), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
