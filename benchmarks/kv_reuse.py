"""Time to first token for a long shared document asked about repeatedly: recompute vs KV tier hits.

Setup: SmolLM2-135M (fp32, CPU), one engine with the DRAM, disk and Redis
tiers (chunks of ``--chunk-blocks`` blocks of 16 tokens; device prefix
caching OFF, so every reuse comes from a lower tier), a ``redis-server``
started here on a loopback port. The prompt is ``--doc-tokens`` tokens of
Jane Austen (tierserve.data.austen) followed by a short question; each
question differs, the document is shared.

Measured (median of ``--repeats`` runs, each a different question):

* recompute: every tier emptied of the document's chunks first;
* dram / disk / redis hit: the tiers above the one measured are emptied, so
  the chunks come from that tier;
* cross-process: a child process (another engine, another PYTHONHASHSEED)
  prefills a second document into Redis; this engine then serves it from Redis.

TTFT is from ``add_request`` to the first token out of ``step()`` (it
includes storing the prompt's new chunks, which a recompute pays).
Prints the table and ratios (recompute TTFT / hit TTFT); writes
benchmarks/results/kv_reuse.json. Target (issue 6): DRAM hit >= 3x faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

QUESTIONS = ["Who is the most sensible person in this passage?", "What happens at the ball?",
             "Summarise the passage in one sentence.", "Which character speaks first?",
             "What is the mood of the passage?", "Name every family mentioned."]


def ttft(engine, ids) -> float:
    from tierserve.sampling_params import SamplingParams

    t0 = time.perf_counter()
    rid = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and first is None:
                first = time.perf_counter() - t0
    return first


def doc_ids(engine, start_char: int, n_tokens: int) -> list[int]:
    from tierserve.data.austen import austen_texts

    text = "".join(austen_texts().values())[start_char:start_char + 8 * n_tokens]
    return engine.tokenize(text)[:n_tokens]


def child_store(model: str | None, url: str, ids: list[int], chunk_blocks: int) -> None:
    script = textwrap.dedent(f"""
        import dataclasses, sys, time
        sys.path.insert(0, {ROOT!r})
        from tierserve.cache.tiers.chunk import chunk_keys
        from tierserve.cache.tiers.config import KVTierConfig
        from tierserve.engine.llm import build_engine_config
        from tierserve.engine.llm_engine import LLMEngine
        from tierserve.sampling_params import SamplingParams
        cfg = build_engine_config({model!r}, num_blocks=512, enable_prefix_caching=False)
        eng = LLMEngine(dataclasses.replace(cfg, kv_tiers=KVTierConfig(tiers=("redis",), chunk_blocks={chunk_blocks},
                                                                        redis_url={url!r})))
        eng.add_request({ids!r}, SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        c = eng.kv_tiers
        keys = chunk_keys({ids!r}, 16, {chunk_blocks})
        while not all(c.backend("redis").contains(k) for k in keys):
            time.sleep(0.05)
        eng.close()
    """)
    env = dict(os.environ, PYTHONHASHSEED="1234")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc-tokens", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-blocks", type=int, default=16)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from test_kv_tiers import drop, start_redis, stop_redis, wait_stored

    from tierserve.cache.tiers.chunk import chunk_keys
    from tierserve.cache.tiers.config import KVTierConfig
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine

    proc, url = start_redis()
    disk = tempfile.mkdtemp(prefix="kv_reuse_disk_")
    try:
        cfg = build_engine_config(args.model, num_blocks=1024, enable_prefix_caching=False, max_num_seqs=4)
        tiers = KVTierConfig(tiers=("dram", "disk", "redis"), chunk_blocks=args.chunk_blocks, dram_gib=2.0,
                             disk_gib=4.0, disk_path=disk, redis_url=url, redis_timeout_s=5.0)
        eng = LLMEngine(dataclasses.replace(cfg, kv_tiers=tiers))
        conn = eng.kv_tiers
        doc = doc_ids(eng, 0, args.doc_tokens)
        asks = [doc + eng.tokenize(" Question: " + q) for q in QUESTIONS]
        all_tiers = ("dram", "disk", "redis")
        keys = chunk_keys(doc, 16, args.chunk_blocks)
        ttft(eng, asks[0])  # warm-up (also stores the chunks)
        results: dict[str, list[float]] = {m: [] for m in ("recompute", "dram", "disk", "redis", "cross_process")}
        for r in range(args.repeats):
            q = asks[1 + r % (len(asks) - 1)]
            wait_stored(conn, doc, all_tiers)
            drop(conn, keys, all_tiers)
            results["recompute"].append(ttft(eng, q))
            for tier, above in (("dram", ()), ("disk", ("dram",)), ("redis", ("dram", "disk"))):
                wait_stored(conn, doc, all_tiers)
                drop(conn, keys, above)
                results[tier].append(ttft(eng, q))
        for r in range(args.repeats):  # a new document each time, prefilled by another process
            doc2 = doc_ids(eng, 200_000 * (r + 1), args.doc_tokens)
            child_store(args.model, url, doc2, args.chunk_blocks)
            results["cross_process"].append(ttft(eng, doc2 + eng.tokenize(" Question: " + QUESTIONS[r])))
        stats = conn.stats()
        eng.close()
    finally:
        stop_redis(proc)
    med = {m: statistics.median(v) for m, v in results.items()}
    print(f"\nTTFT, {args.doc_tokens}-token shared document, chunks of {args.chunk_blocks * 16} tokens, "
          f"median of {args.repeats}")
    print(f"{'mode':<15}{'TTFT s':>10}{'speed-up':>10}")
    for m, v in med.items():
        print(f"{m:<15}{v:>10.3f}{med['recompute'] / v:>9.1f}x")
    print(f"tier hits {stats.hits}, load seconds {stats.load_seconds:.2f}")
    out = {"doc_tokens": args.doc_tokens, "chunk_tokens": args.chunk_blocks * 16, "repeats": args.repeats,
           "ttft_s": results, "median_s": med, "speedup": {m: med["recompute"] / v for m, v in med.items()},
           "tier_hits": stats.hits}
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kv_reuse.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
