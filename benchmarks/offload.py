"""Decode tokens/s of a MoE all-resident vs offloaded over 2 expert hosts on a simulated 3-node cluster.

Claim checked: offloaded decode keeps a fraction of all-resident speed (anchors:
KTransformers 62-67% with 10-50% of experts resident, Luce Spark 85% at 60%).
Model: the MoEfied SmolLM2 (``ensure_moe_model``); ``--random`` uses a random Mixtral
of SmolLM2-135M's shape instead. Each run: one greedy request, ``--tokens`` decode
steps timed after the prefill, through ``LLMEngine`` with ``OffloadConfig`` (fused
dispatch over the default channel, a direct TCP socket per host). Placement:
``--placement id`` ranks experts by id (uniform counts); ``--placement usage`` first
runs a calibration pass (``--calib-windows`` windows of 256 tokens from the Austen
calibration novels, tierserve.moe.calibration, through the all-resident model with a
usage recorder), writes the counts to a usage file and places the hot set by them.
Each row also reports the cold-hit rate: the fraction of (token, slot) routing
assignments of the request (prefill included) that went to an offloaded expert. Also measured: one ``ExpertHost.compute`` round trip
with a decode-size numpy payload (1 and 4 rows x hidden) over each channel: a plain
Ray actor call and the socket channel (``tierserve/moe/socket_channel.py``), to one
host and to both hosts at once (what a decode layer does).
Writes benchmarks/results/offload.json.

    python benchmarks/offload.py [--tokens 32] [--random] [--placement id|usage] [--residency 0.25 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from tierserve.config import OffloadConfig  # noqa: E402
from tierserve.engine.llm import build_engine_config  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"


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
    from tierserve.moe.calibration import CALIBRATION_NOVELS, austen_token_windows, forward_logits
    from tierserve.moe.usage import ExpertUsage
    from tierserve.moe.usage_hook import attach_usage_recorder, moe_blocks

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


def _cold_hit_rate(handle) -> float:
    counts = handle.live.counts
    cold = sum(counts[j][e] for j, e in handle.placement.cold_keys())
    return cold / max(1, sum(sum(row) for row in counts))


def _decode_tps(path: str, offload: OffloadConfig | None, tokens: int) -> tuple[float, list[int], float, float]:
    config = build_engine_config(path, num_blocks=64, max_num_seqs=1, max_model_len=512)
    if offload is not None:
        config = dataclasses.replace(config, offload=offload)
    engine = LLMEngine(config)
    frac = 1.0 if engine.offload is None else engine.offload.placement.fraction_resident
    engine.add_request(PROMPT, SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    engine.step()  # prefill + first token
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    dt = time.perf_counter() - t0
    cold_hit = 0.0
    if engine.offload is not None:
        cold_hit = _cold_hit_rate(engine.offload)
        engine.close()
    return len(out) / dt, out, frac, cold_hit


def _round_trip(hidden: int, layer_experts: int) -> dict:
    from tierserve.actors.expert_host import ExpertHost
    from tierserve.moe.expert_weights import ExpertWeights
    from tierserve.moe.socket_channel import SocketChannel

    hosts = [ExpertHost.remote("auto") for _ in range(2)]
    w = ExpertWeights(np.random.randn(2 * 64, hidden).astype(np.float32),
                      np.random.randn(hidden, 64).astype(np.float32), "silu", "float32")
    ray.get([h.load_experts.remote({(0, e): w for e in range(layer_experts)}) for h in hosts])
    channels = [SocketChannel((ip, port), 30.0, bytes.fromhex(token))
                for ip, port, token in ray.get([h.open_channel.remote() for h in hosts])]

    def ray_call(hs, x, ids):
        ray.get([h.compute.remote(0, x, ids) for h in hs])

    def socket_call(chs, x, ids):
        for ch in chs:
            ch.send(0, x, ids, "float32")
        for ch in chs:
            ch.recv(time.monotonic() + 30.0)

    res = {}
    for rows in (1, 4):
        x = np.random.randn(rows, hidden).astype(np.float32)
        ids = np.zeros(rows, dtype=np.int64)
        for name, call, targets in (("ray", ray_call, hosts), ("socket", socket_call, channels)):
            for n in (1, 2):
                times = []
                for _ in range(110):
                    t0 = time.perf_counter()
                    call(targets[:n], x, ids)
                    times.append(time.perf_counter() - t0)
                res[f"{name}_{n}host_rows_{rows}_median_ms"] = 1e3 * statistics.median(times[10:])
    for ch in channels:
        ch.close()
    for h in hosts:
        ray.kill(h)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--placement", choices=("id", "usage"), default="id")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--residency", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "offload.json"))
    args = ap.parse_args(argv)
    if args.random:
        path = _random_moe(tempfile.mkdtemp(prefix="moe-rand-"))
    else:
        from tierserve.moe.moefy import ensure_moe_model

        path = ensure_moe_model()
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    layers, experts = hf["num_hidden_layers"], hf.get("num_local_experts") or hf.get("num_experts")
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=200 * 2**20))
    for _ in range(2):
        cluster.add_node(num_cpus=0, resources={"expert_host": 1}, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    rows = []
    usage_dir = tempfile.mkdtemp(prefix="moe-usage-")
    calib_file = os.path.join(usage_dir, "calibration.json")
    if args.placement == "usage":
        t0 = time.perf_counter()
        _calibrate(path, calib_file, args.calib_windows)
        print(f"calibration: {args.calib_windows} x 256 Austen tokens in {time.perf_counter() - t0:.1f}s")
    try:
        base_tps, base_tokens, _, _ = _decode_tps(path, None, args.tokens)
        rows.append(dict(residency=1.0, fraction_resident=1.0, offloaded=False, tok_s=base_tps, kept=1.0,
                         identical=True, placement="-", cold_hit=0.0))
        for i, residency in enumerate(args.residency):
            # a fresh copy per run: the engine saves its live counts back to its usage file on close
            run_file = os.path.join(usage_dir, f"run{i}.json")
            if args.placement == "usage":
                with open(calib_file) as src, open(run_file, "w") as dst:
                    dst.write(src.read())
            cfg = OffloadConfig(resident_experts=round(layers * experts * residency), expert_hosts=2,
                                usage_path=run_file)
            tps, tokens, frac, cold_hit = _decode_tps(path, cfg, args.tokens)
            rows.append(dict(residency=residency, fraction_resident=frac, offloaded=True, tok_s=tps,
                             kept=tps / base_tps, identical=tokens == base_tokens, placement=args.placement,
                             cold_hit=cold_hit))
        rtt = _round_trip(hf["hidden_size"], 4)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"model: {path} ({layers} MoE layers x {experts} experts)")
    print(f"{'resident':>9} {'offload':>8} {'placement':>9} {'tok/s':>8} {'kept':>6} {'cold hit':>8} "
          f"{'identical':>9}")
    for r in rows:
        print(f"{r['fraction_resident']:>9.2f} {str(r['offloaded']):>8} {r['placement']:>9} {r['tok_s']:>8.2f} "
              f"{r['kept']:>6.2f} {r['cold_hit']:>8.3f} {str(r['identical']):>9}")
    print("ExpertHost.compute round trip, median ms (decode payloads):")
    for k, v in rtt.items():
        print(f"  {k:<32} {v:7.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=path, tokens=args.tokens, placement=args.placement, rows=rows, round_trip=rtt), f,
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
