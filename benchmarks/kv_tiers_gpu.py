"""Time to first token of a request sharing a 4k-token prefix, on the GPU: recompute, GPU-page hit, DRAM hit.

Model: the random-weight Llama-3.2-1B shape in bf16 (tierserve/tools/random_model.py),
cut to ``--layers`` layers (default all 16). A shared prefix of ``--prefix``
(4096) random token ids; each request is the prefix plus its own 32-token
question; TTFT = seconds from ``add_request`` to the step that returns its
first token (median of ``--repeats``).

- recompute: a prefix never seen (a fresh random prefix per repeat) on the
  engine with the device prefix cache on: the whole prompt is prefilled;
- GPU-page hit: the same engine, the shared prefix already served once: its
  pages are found in the device prefix cache and only the question is
  prefilled;
- DRAM hit: an engine with the device prefix cache OFF and the DRAM tier
  (cache/tiers/, LMCache's CPU backend): the shared prefix's chunks were
  stored when the first request finished, and a hit copies them from host
  memory into GPU pages, then prefills the question. Where LMCache is not
  installed (the GPU check machine: no network, LMCache's native extensions
  are built per Python and torch) this row is replaced by ``DRAM copy path``:
  the prefix's chunk payloads gathered once from the GPU pages into host memory
  (ChunkLayout, as the tier stores them) and, per repeat, scattered back into
  the pages plus the GPU-page-hit prefill of the question; it leaves out the
  tier's lookup and checksum, and says so.

Stores (asynchronous, cache/tiers/connector.py): the host time a step pays to store the prefix's chunks
from the pages, a synchronous gather against issuing the asynchronous ones (and when their copies were
done); with LMCache, also the TTFT of the first request, whose prompt's chunks are stored as it finishes,
beside the recompute TTFT.

Target (issue: GPU worker + KV tiers): DRAM hit >= 10x faster to first token
than recompute. The device copy bandwidth is printed beside the table.

Usage: python benchmarks/kv_tiers_gpu.py --out DIR [--prefix 4096] [--layers 16] [--repeats 3]
Without CUDA it exits 0 unless ``--device cpu`` (smoke run: ``--layers 1 --prefix 256``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_gpu import sync  # noqa: E402
from gpu_setup import parse_device_args  # noqa: E402
from tierserve.cache.tiers.chunk_layout import ChunkLayout  # noqa: E402
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from tierserve.engine.llm_engine import LLMEngine  # noqa: E402
from tierserve.sampling_params import SamplingParams  # noqa: E402
from tierserve.tools.random_model import save_random_model  # noqa: E402

QUESTION = 32
CHUNK_BLOCKS = 16


def ttft(engine: LLMEngine, ids: list[int]) -> float:
    sync(engine.device)
    t0 = time.perf_counter()
    rid = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and first is None:
                sync(engine.device)
                first = time.perf_counter() - t0
    return first


def base_config(folder: str, device: str, prefix: int, prefix_caching: bool) -> EngineConfig:
    blocks = 2 * (prefix + QUESTION) // 16 + 64
    return EngineConfig(model=ModelConfig(model=folder, dtype="bfloat16" if device == "cuda" else "float32"),
                        device=device, cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=prefix_caching),
                        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=prefix + QUESTION))


def store_cost(layout: ChunkLayout, chunks: list[list[int]], device) -> dict:
    """Host seconds a step pays to store ``chunks``: a synchronous gather (waits for every device-to-host copy)
    against issuing the asynchronous gathers (``gather_async``, what the tiers' stores do), and the seconds
    until the last asynchronous copy completed."""
    sync(device)
    t0 = time.perf_counter()
    for c in chunks:
        layout.gather(c)
    sync_s = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    pending = [layout.gather_async(c) for c in chunks]
    issue_s = time.perf_counter() - t0
    for _, done in pending:
        if done is not None:
            done.synchronize()
    return dict(sync_gather_s=sync_s, async_issue_s=issue_s, async_done_s=time.perf_counter() - t0)


def dram_hit(folder, args, shared, asks) -> tuple[str, list[float], dict]:
    """The DRAM tier's hits, or the copy path where LMCache is absent (module doc); and the store costs."""
    if importlib.util.find_spec("lmcache") is not None:
        from tierserve.cache.tiers.config import KVTierConfig

        cfg = dataclasses.replace(base_config(folder, args.device, args.prefix, False),
                                  kv_tiers=KVTierConfig(tiers=("dram",), chunk_blocks=CHUNK_BLOCKS, dram_gib=4.0))
        eng = LLMEngine(cfg)
        store = dict(first_request_with_store_s=ttft(eng, asks[0]))  # stores the prefix's chunks (asynchronous)
        times = [ttft(eng, a) for a in asks[1:]]
        served = eng.kv_tiers.stats()
        n = len(shared) // (16 * CHUNK_BLOCKS)
        store.update(store_cost(ChunkLayout(eng.runner.kv_caches, CHUNK_BLOCKS),
                                [list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)) for i in range(n)], eng.device))
        eng.close()
        print(f"DRAM tier: {served}")
        return "DRAM hit", times, store
    eng = LLMEngine(base_config(folder, args.device, args.prefix, True))
    ttft(eng, asks[0])
    layout = ChunkLayout(eng.runner.kv_caches, CHUNK_BLOCKS)
    # the prefix's bytes, gathered once as the tier would store them; each repeat writes the same bytes back
    # into the same pages (so no page changes) and then prefills the question over the cached prefix
    n = len(shared) // (16 * CHUNK_BLOCKS)
    chunks = [list(range(i * CHUNK_BLOCKS, (i + 1) * CHUNK_BLOCKS)) for i in range(n)]
    payloads = [layout.gather(c) for c in chunks]
    store = store_cost(layout, chunks, eng.device)
    times = []
    for a in asks[1:]:
        sync(eng.device)
        t0 = time.perf_counter()
        for p, c in zip(payloads, chunks):
            layout.scatter(p, 0, c)
        sync(eng.device)
        times.append(time.perf_counter() - t0 + ttft(eng, a))
    eng.close()
    return "DRAM copy path (LMCache absent: no lookup/checksum)", times, store


def _add_arguments(ap) -> None:
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)


def main() -> int:
    run = parse_device_args("kv_tiers_gpu", __doc__, _add_arguments)
    if run is None:
        return 0
    args, device, bw = run.args, run.device, run.copy_gbs
    gen = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(1, 120000, (n,), generator=gen).tolist()

    shared = rand(args.prefix)
    asks = [shared + rand(QUESTION) for _ in range(args.repeats + 1)]
    with tempfile.TemporaryDirectory() as folder:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        save_random_model("llama-1b", folder, num_layers=args.layers, dtype=dtype, device=args.device)
        eng = LLMEngine(base_config(folder, args.device, args.prefix, True))
        ttft(eng, rand(args.prefix + QUESTION))  # warm-up: kernels compile for these shapes
        recompute = [ttft(eng, rand(args.prefix + QUESTION)) for _ in range(args.repeats)]
        ttft(eng, asks[0])
        gpu_hit = [ttft(eng, a) for a in asks[1:]]
        eng.close()
        del eng
        dram_name, dram, store = dram_hit(folder, args, shared, asks)
    rows = [("recompute", recompute), ("GPU-page hit", gpu_hit), (dram_name, dram)]
    base = statistics.median(recompute)
    print(f"device copy bandwidth {bw:.0f} GB/s (read + write); {args.prefix}-token shared prefix + {QUESTION}")
    print(f"{'mode':<52}{'TTFT ms':>10}{'x faster':>10}")
    out = []
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:<52}{med * 1e3:10.1f}{base / med:10.1f}")
        out.append(dict(mode=name, ttft_s=med, times=times, speedup_vs_recompute=base / med))
    print(f"target: DRAM hit >= 10x faster than recompute: {base / statistics.median(dram):.1f}x")
    print(f"storing the {args.prefix}-token prefix ({args.prefix // (16 * CHUNK_BLOCKS)} chunks) from the pages: "
          f"synchronous gather {store['sync_gather_s'] * 1e3:.1f} ms of host time, asynchronous "
          f"{store['async_issue_s'] * 1e3:.1f} ms to issue (copies done after {store['async_done_s'] * 1e3:.1f} ms)"
          + (f"; first request TTFT with the async store {store['first_request_with_store_s'] * 1e3:.1f} ms vs "
             f"recompute {base * 1e3:.1f} ms" if "first_request_with_store_s" in store else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kv_tiers_gpu.json"), "w") as f:
        json.dump(dict(copy_bandwidth_gbs=bw, prefix=args.prefix, rows=out, store=store), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
