"""Compressed KV pages in the lower tiers: kv4 and XQuant chunks stored packed, loaded back exactly.

A storage format's chunk is its pages' bytes (cache/tiers/chunk_layout.py), so a chunk shrinks by the
format's ratio and a hit copies packed bytes back. The reference is the same engine's full recompute
(the first request, when no tier has the prompt), in the same two forwards as a load (96 tokens, then 4):
the loaded pages are bit-identical to the recomputed ones, so the logits match to the recompute's own
rounding (the bound of tests/test_kv_tiers.py).
"""

from __future__ import annotations

import dataclasses

import pytest
from test_kv_tiers import first_token_logits, prompt, wait_stored

from tierserve.cache.tiers.chunk import CorruptChunkError, record_size, verify_record, write_record
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.config import KVCompressionConfig
from tierserve.errors import InvalidParameterError

CHUNK_BLOCKS = 2


def build(smollm_folder, kvc: KVCompressionConfig, disk_path: str):
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine

    cfg = build_engine_config(smollm_folder, num_blocks=64, enable_prefix_caching=False, max_num_seqs=2,
                              long_prefill_token_threshold=96, linear_backend="torch")
    tiers = KVTierConfig(tiers=("dram", "disk"), chunk_blocks=CHUNK_BLOCKS, dram_gib=0.05, disk_gib=0.05,
                         disk_path=disk_path)
    return LLMEngine(dataclasses.replace(cfg, kv_tiers=tiers, kv_compression=kvc))


@pytest.mark.parametrize("method", ["kv4", "xquant"])
def test_compressed_chunks_load_exactly_from_dram_and_disk(smollm_folder, tmp_path, method):
    engine = build(smollm_folder, KVCompressionConfig(method), str(tmp_path / "kvdisk"))
    try:
        conn = engine.kv_tiers
        page = engine.kv_compressor.page_size_bytes()
        assert conn.payload_bytes == CHUNK_BLOCKS * page
        plain = CHUNK_BLOCKS * engine.model.kv_spec(16).page_size_bytes
        assert plain / conn.payload_bytes >= 6.39  # kv4 6.4x below fp32 pages; xquant the same plus positions
        for tier, salt in (("dram", "[a]"), ("disk", "[b]")):
            ids = prompt(engine, salt)
            ref, ref_tokens = first_token_logits(engine, ids)  # nothing stored yet: full recompute
            keys = wait_stored(conn, ids, ("dram", "disk"))
            if tier == "disk":
                for k in keys:
                    conn.backend("dram").remove(k)
            before = conn.stats()
            got, tokens = first_token_logits(engine, ids)
            after = conn.stats()
            assert after.hits[tier] - before.hits[tier] == 3
            assert after.bytes_loaded[tier] - before.bytes_loaded[tier] == 3 * conn.payload_bytes
            assert (got - ref).abs().max().item() <= 1e-5 and tokens == ref_tokens
    finally:
        engine.close()


def test_eviction_with_tiers_is_refused_with_the_reason(smollm_folder, tmp_path):
    with pytest.raises(InvalidParameterError, match="kv_tiers.*kv4\\+streaming.*no longer maps to token chunks"):
        build(smollm_folder, KVCompressionConfig("kv4,streaming", budget=64), str(tmp_path))


def test_record_of_another_length_is_rejected():
    key, shape, raw = bytes(range(32)), (1, 2, 4, 1, 2), bytes(range(40))
    buf = bytearray(record_size(len(raw)))
    write_record(memoryview(buf), key, "float32", shape, memoryview(raw))
    assert bytes(verify_record(memoryview(buf), key, "float32", shape, 40)) == raw
    with pytest.raises(CorruptChunkError, match="payload of 40 bytes differs from the expected 64"):
        verify_record(memoryview(buf), key, "float32", shape, 64)
