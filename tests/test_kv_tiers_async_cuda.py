"""Asynchronous KV chunk stores from GPU pages, and prefix hits loaded back into them (``cuda`` marker).

- ``gather_async`` on GPU pages: the chunk is staged on the compute stream and copied device-to-host on a
  side stream; the pages are then overwritten at once on the compute stream (a freed block reused by the
  next step) and the host payload, once its event completed, still holds exactly the bytes the pages had
  at the gather (compared with the CPU gather of a copy taken before the overwrite).
- Engine with the DRAM tier and device prefix caching off (the tiny random Qwen3-MoE, all experts
  resident): request A (prefix + question 1) finishes and its prefix chunks are stored asynchronously;
  request B (prefix + question 2) is served from the tier (the lookup waits for a store still in flight).
  B's first-token logits equal a recompute on an engine without tiers (fp32 on the CPU: within 1e-5;
  bf16 on CUDA: the bf16 bound of tests/test_engine_cuda.py), and the pages B's prefix was loaded into
  are byte-identical to the stored record's payload (``verify_record`` of the tier's record). The CPU
  case runs here (LMCache installed); the CUDA case needs LMCache on the GPU machine, else it is skipped.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import Qwen3MoeConfig

from model_harness import TINY_QWEN3_MOE, build_and_save
from tierserve.cache.tiers.chunk import chunk_keys, verify_record
from tierserve.cache.tiers.chunk_layout import ChunkLayout
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.kv_spec import KVSpec
from tierserve.sampling_params import SamplingParams
from tierserve.tools.random_model import word_tokenizer

CUDA = pytest.mark.cuda
CHUNK_BLOCKS = 2  # 32-token chunks with block_size 16
PREFIX = [(7 * i + 3) % 380 + 1 for i in range(64)]  # two whole chunks


@CUDA
def test_async_gather_survives_page_reuse():
    spec = KVSpec(num_layers=3, num_kv_heads=4, head_dim=32, block_size=16, dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    gpu = allocate_kv_cache(spec, 24, torch.device("cuda"))
    for c in gpu:
        c.k.copy_(torch.randn(c.k.shape, generator=g).bfloat16())
        c.v.copy_(torch.randn(c.v.shape, generator=g).bfloat16())
    blocks = [9, 2, 17]
    big = torch.randn(4096, 4096, device="cuda")
    for c in gpu:  # queued behind a long matmul on the compute stream: the gather must see it
        (big @ big).sum()
        c.v[blocks[1]].fill_(-2.0)
    expected = ChunkLayout([type(c)(c.k.cpu(), c.v.cpu()) for c in gpu], 3).gather(blocks)
    payload, done = ChunkLayout(gpu, 3).gather_async(blocks)
    assert done is not None and payload.is_pinned()
    for c in gpu:  # the blocks reused at once by later kernels on the compute stream
        (big @ big).sum()
        c.k[blocks].fill_(7.0)
        c.v[blocks].zero_()
    done.synchronize()
    assert torch.equal(payload, expected)


def _engine(folder: str, device: str, tiers: bool):
    from tierserve.cache.tiers.config import KVTierConfig
    from tierserve.engine.llm_engine import LLMEngine

    cfg = EngineConfig(model=ModelConfig(model=folder, dtype="bfloat16" if device == "cuda" else "float32"),
                       device=device, cache=CacheConfig(num_blocks=48, block_size=16, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=2))
    if tiers:
        cfg = dataclasses.replace(cfg, kv_tiers=KVTierConfig(tiers=("dram",), chunk_blocks=CHUNK_BLOCKS,
                                                             dram_gib=0.05))
    return LLMEngine(cfg)


def _first_logits(eng, ids: list[int]) -> torch.Tensor:
    captured = []
    execute = eng.runner.execute

    def spy(out, requests):
        run = execute(out, requests)
        if not captured:
            captured.append(run.logits[0].float().cpu())
        return run

    eng.runner.execute = spy
    eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    eng.runner.execute = execute
    return captured[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_prefix_hit_in_pages_equals_recompute_and_the_stored_bytes(tmp_path, device):
    pytest.importorskip("lmcache")
    build_and_save(Qwen3MoeConfig(**TINY_QWEN3_MOE), str(tmp_path), seed=5, noise=0.2)
    word_tokenizer(TINY_QWEN3_MOE["vocab_size"]).save_pretrained(str(tmp_path))
    a, b = PREFIX + [11, 12, 13, 14, 15], PREFIX + [200, 201, 202]
    ref = _engine(str(tmp_path), device, tiers=False)
    try:
        want = _first_logits(ref, b)
    finally:
        ref.close()
    eng = _engine(str(tmp_path), device, tiers=True)
    try:
        conn = eng.kv_tiers
        _first_logits(eng, a)  # stores the prefix's 2 chunks (asynchronously on GPU pages)
        loads = []
        commit = conn.commit

        def spy(request, num_device_hit, num_external):
            loads.append((list(request.block_ids), num_device_hit, num_external))
            commit(request, num_device_hit, num_external)

        conn.commit = spy
        got = _first_logits(eng, b)
        assert [(h, e) for _, h, e in loads] == [(0, len(PREFIX))]  # the whole prefix from the tier
        assert conn.stats().hits["dram"] == 2
        layout = ChunkLayout(eng.runner.kv_caches, CHUNK_BLOCKS)
        keys = chunk_keys(PREFIX, 16, CHUNK_BLOCKS)
        assert len(keys) == 2
        for j, key in enumerate(keys):
            record = conn.backend("dram").get(key)
            stored = bytes(verify_record(record.view(), key, conn.spec.dtype, conn.shape, conn.payload_bytes))
            record.release()
            pages = layout.gather(loads[0][0][j * CHUNK_BLOCKS:(j + 1) * CHUNK_BLOCKS])
            assert bytes(pages.numpy()) == stored, f"chunk {j}"
    finally:
        eng.close()
    if device == "cpu":
        assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    else:
        rel = float((got - want).norm() / want.norm())
        assert rel <= 8 * 2 ** -8 * math.sqrt(TINY_QWEN3_MOE["num_hidden_layers"]), rel
