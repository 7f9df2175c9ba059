"""Tiered KV store across processes: stable chunk keys, and a second engine served from Redis.

* Chunk keys (and LMCache's key strings, the Redis keys and disk file names)
  are computed in subprocesses with different PYTHONHASHSEED values and must
  be identical to each other and to this process's.
* Engine A runs in a child process (its own PYTHONHASHSEED) with the Redis
  tier only: it computes the prompt from scratch, stores its chunks in a
  real redis-server started here, and saves its first-token logits. Engine B
  (this process, empty DRAM) then serves the prompt's chunks from Redis; its
  logits must equal B's own full recompute (split 96 + 4 tokens like the load
  path) within 1e-5 (fp32), and A's one-forward recompute within 1e-4 (a
  4-row and a 100-row GEMM round differently: 4e-5 measured).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import torch

from test_kv_tiers import first_token_logits, start_redis, stop_redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEYS_SCRIPT = textwrap.dedent("""
    import json, torch
    from tierserve.cache.tiers.chunk import chunk_keys
    from tierserve.cache.tiers.lmcache_runtime import lmcache_key
    keys = chunk_keys(list(range(7, 7 + 100)), 16, 2)
    print(json.dumps([lmcache_key("tierserve-x", torch.float32, k).to_string() for k in keys]))
""")

ENGINE_A = textwrap.dedent("""
    import dataclasses, sys, torch
    sys.path.insert(0, {tests!r})
    from test_kv_tiers import first_token_logits
    from tierserve.cache.tiers.config import KVTierConfig
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine
    cfg = build_engine_config({model!r}, num_blocks=64, enable_prefix_caching=False, num_threads=2)
    eng = LLMEngine(dataclasses.replace(cfg, kv_tiers=KVTierConfig(tiers=("redis",), chunk_blocks=2,
                                                                    redis_url={url!r})))
    logits, tokens = first_token_logits(eng, {ids!r})
    assert eng.kv_tiers.stats().bytes_stored["redis"] == 3 * eng.kv_tiers.payload_bytes
    import time
    deadline = time.monotonic() + 20
    conn = eng.kv_tiers
    from tierserve.cache.tiers.chunk import chunk_keys
    keys = chunk_keys({ids!r}, 16, 2)
    while not all(conn.backend("redis").contains(k) for k in keys):
        assert time.monotonic() < deadline, "chunks not in redis"
        time.sleep(0.05)
    torch.save({{"logits": logits, "tokens": tokens}}, {out!r})
    eng.close()
""")


def _run(script: str, seed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_chunk_keys_identical_across_pythonhashseed():
    from tierserve.cache.tiers.chunk import chunk_keys
    from tierserve.cache.tiers.lmcache_runtime import lmcache_key

    here = [lmcache_key("tierserve-x", torch.float32, k).to_string() for k in chunk_keys(list(range(7, 107)), 16, 2)]
    a = json.loads(_run(KEYS_SCRIPT, "1").strip().splitlines()[-1])
    b = json.loads(_run(KEYS_SCRIPT, "4242").strip().splitlines()[-1])
    assert a == b == here and len(here) == 3
    assert here[0].startswith("tierserve-x@1@0@") and here[0].endswith("@float")


def test_second_process_served_from_redis_equals_recompute(smollm_folder, tmp_path):
    from tierserve.cache.tiers.config import KVTierConfig
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine
    from tierserve.engine.scheduler import NoExternalPrefix

    proc, url = start_redis()
    try:
        # the same thread count in both processes: fp32 reductions then run in the same order
        cfg = build_engine_config(smollm_folder, num_blocks=64, enable_prefix_caching=False, num_threads=2)
        eng = LLMEngine(dataclasses.replace(cfg, kv_tiers=KVTierConfig(tiers=("redis",), chunk_blocks=2,
                                                                        redis_url=url)))
        ids = eng.tokenize("Mr. Darcy walked off; and Elizabeth remained with no very cordial feelings "
                           "toward him. She told the story, however, with great spirit among her friends; "
                           "for she had a lively, playful disposition, which delighted in anything ridiculous. "
                           * 2)[:100]
        # this process's own full recompute, with the tiers detached (nothing looked up or stored), in
        # the same two forwards as the load path (96 tokens, then 4): same GEMM shapes, same rounding
        conn, hooks, external = eng.kv_tiers, list(eng.hooks), eng.scheduler.external
        eng.hooks[:] = [h for h in hooks if h is not conn]
        eng.scheduler.external = NoExternalPrefix()
        sched_cfg = eng.scheduler.config
        eng.scheduler.config = dataclasses.replace(sched_cfg, long_prefill_token_threshold=96)
        own_ref, own_tokens = first_token_logits(eng, ids)
        assert conn.stats().lookups == 0 and conn.stats().bytes_stored["redis"] == 0  # really detached
        eng.scheduler.config = sched_cfg
        eng.hooks[:] = hooks
        eng.scheduler.external = external
        out = str(tmp_path / "a.pt")
        _run(ENGINE_A.format(tests=os.path.join(ROOT, "tests"), model=smollm_folder, url=url, ids=ids, out=out),
             "77")
        ref = torch.load(out)
        logits, tokens = first_token_logits(eng, ids)
        stats = eng.kv_tiers.stats()
        assert stats.hits["redis"] == 3 and stats.hit_tokens["redis"] == 96
        assert (logits - own_ref).abs().max().item() <= 1e-5  # equals a full recompute (fp32)
        assert tokens == own_tokens == ref["tokens"]
        # the other process's one-forward recompute agrees to fp32 noise (measured 4e-5: computing the last
        # 4 tokens in a 100-row or a 4-row GEMM rounds differently; the loaded KV itself is bit-exact)
        assert (logits - ref["logits"]).abs().max().item() <= 1e-4
        eng.close()
    finally:
        stop_redis(proc)
