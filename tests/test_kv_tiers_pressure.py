"""The DRAM tier under capacity pressure, on the real SmolLM2 engine: LRU eviction of chunks and the lookup walk.

A DRAM-only tier sized for 3 chunk records (SmolLM2, chunks of 2 blocks = 32 tokens: a record is the
1 474 560-byte payload plus its header; LMCache rounds each allocation up, so 3.5 record sizes hold 3 and
not 4), device prefix caching off, and prefill in forwards of at most 32 tokens, so a run that loads its
first chunk computes the rest in the same forwards (32-token pieces) as a full recompute: its logits
equal the recompute's bit for bit. Two 70-token prompts A and B (2 whole chunks each):

1. A runs on empty tiers (the reference A) and stores A0, A1;
2. A's first 40 tokens run: served A0 from DRAM (1 chunk), which becomes the most recently used;
3. B runs (the reference B): B0 takes the free third record, B1 evicts the least recently used, A1:
   the tier holds A0, B0, B1 (its index, ``holdings``);
4. A runs again: its walk takes A0 and stops at the evicted A1 (exactly 1 hit, 32 tokens), the rest is
   recomputed, logits and tokens equal reference A; storing A1 evicts B0 (A0 was just read);
5. B runs again: B0 is gone, so no chunk is served (B1, still held, is past the walk's end); output
   equals reference B.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_kv_tiers_store_failures import TEXT, run

from tierserve.cache.tiers.chunk import chunk_keys, record_size
from tierserve.cache.tiers.config import KVTierConfig

PAYLOAD = 30 * 32 * 2 * 3 * 64 * 4  # SmolLM2: layers x chunk tokens x (K, V) x kv heads x head dim x float32


@pytest.fixture
def engine(smollm_folder):
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine

    cfg = build_engine_config(smollm_folder, num_blocks=128, enable_prefix_caching=False, max_num_seqs=4,
                              long_prefill_token_threshold=32)
    tiers = KVTierConfig(tiers=("dram",), chunk_blocks=2, dram_gib=3.5 * record_size(PAYLOAD) / 2**30)
    eng = LLMEngine(dataclasses.replace(cfg, kv_tiers=tiers))
    yield eng
    eng.close()


def test_dram_pressure_evicts_lru_chunks_and_the_walk_stops_at_the_first_gap(engine):
    conn = engine.kv_tiers
    dram = conn.backend("dram")
    assert conn.payload_bytes == PAYLOAD
    a = engine.tokenize("[A] " + TEXT)[:70]
    b = engine.tokenize("[B] " + TEXT)[:70]
    ka, kb = (chunk_keys(ids, conn.spec.block_size, conn.chunk_blocks) for ids in (a, b))
    assert len(a) == len(b) == 70 and len(ka) == len(kb) == 2

    def held() -> set[str]:
        names = {k: f"A{i}" for i, k in enumerate(ka)} | {k: f"B{i}" for i, k in enumerate(kb)}
        return {names[k] for k in dram.holdings().keys}

    def hits(ids):
        before = conn.stats().hits["dram"]
        out = run(engine, ids)
        return conn.stats().hits["dram"] - before, out

    n, (ref_a, tok_a) = hits(a)
    assert n == 0 and held() == {"A0", "A1"}
    n, _ = hits(a[:40])
    assert n == 1
    n, (ref_b, tok_b) = hits(b)
    assert n == 0 and held() == {"A0", "B0", "B1"}
    before = conn.stats()
    n, (logits, tokens) = hits(a)
    assert n == 1 and conn.stats().hit_tokens["dram"] - before.hit_tokens["dram"] == 32
    assert torch.equal(logits, ref_a) and tokens == tok_a
    assert held() == {"A0", "A1", "B1"}
    n, (logits, tokens) = hits(b)
    assert n == 0 and torch.equal(logits, ref_b) and tokens == tok_b
    assert conn.stats().failures["dram"] == 0
