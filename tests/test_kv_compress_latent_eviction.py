"""XQuant / XQuant-CL pages composed with eviction (``--kv-compression xquant_cl,expected_attention``).

Eviction drops whole token blocks from a sequence's table, in every layer at
once; XQuant-CL's delta chain runs across LAYERS of one token (same slot), so
the kept tokens keep their whole chain and rematerialise K (RoPE at the stored
positions) and V as before. Reference: the same eviction method on plain fp32
pages. With lossless latents (``latent_bits=0``) the composed engine must keep
the same blocks step by step, pick the same greedy tokens and give the same
logits up to fp32 rounding of the rematerialisation (measured <= 6e-6 here).
Tiny random Llama (3 layers, GQA), block size 4, budget 16 tokens.
"""

from __future__ import annotations

import pytest
import torch

from model_harness import save_tiny_llama
from tierserve.config import CacheConfig, EngineConfig, KVCompressionConfig, ModelConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams

PROMPTS = [[(7 * i + 3) % 500 + 1 for i in range(40)], [(11 * i + 5) % 500 + 1 for i in range(23)]]
BUDGET = 16


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_gqa_latent_eviction")), hidden_size=128,
                           intermediate_size=256, num_hidden_layers=3, vocab_size=512, max_position_embeddings=256)


def _run(folder: str, kvc: KVCompressionConfig):
    """Greedy tokens, the runner's logits per step, and (evicted tokens, table length) per request per step."""
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=folder), cache=CacheConfig(num_blocks=64, block_size=4),
                                 scheduler=SchedulerConfig(max_num_seqs=4), kv_compression=kvc))
    logits = []
    execute = eng.runner.execute

    def recording(out, requests):  # records the real output, changes nothing
        run = execute(out, requests)
        logits.append(run.logits.clone())
        return run

    eng.runner.execute = recording
    ids = [eng.add_request(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)) for p in PROMPTS]
    tokens, tables = {i: [] for i in ids}, []
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id].extend(out.new_token_ids)
        tables.append({r: (eng.kv_manager.num_evicted_tokens(r), len(eng.get_request(r).block_ids))
                       for r in eng.request_ids()})
    return eng, [tokens[i] for i in ids], logits, tables


@pytest.mark.parametrize("fmt", ["xquant_cl", "xquant"])
@pytest.mark.parametrize("evictor", ["expected_attention", "streaming"])
def test_lossless_latent_with_eviction_equals_eviction_on_plain_pages(tiny_gqa, fmt, evictor):
    _, ref_tokens, ref_logits, ref_tables = _run(tiny_gqa, KVCompressionConfig(evictor, budget=BUDGET))
    eng, tokens, logits, tables = _run(tiny_gqa, KVCompressionConfig(f"{fmt},{evictor}", budget=BUDGET,
                                                                     latent_bits=0))
    assert eng.kv_compressor.name == f"{fmt}+{evictor}"
    assert eng.kv_evictor.num_evicted_blocks > 0  # the prompts (40 and 23 tokens) exceed the budget
    assert tables == ref_tables
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for got, ref in zip(logits, ref_logits):
        torch.testing.assert_close(got, ref, rtol=0, atol=5e-5)


def test_low_bit_deltas_with_streaming_keep_streamings_blocks(tiny_gqa):
    """StreamingLLM's choice does not read the pages: 3-bit XQuant-CL deltas evict exactly the blocks it evicts
    on plain pages, and the cache stays within budget + one block."""
    _, _, _, ref_tables = _run(tiny_gqa, KVCompressionConfig("streaming", budget=BUDGET))
    eng, tokens, logits, tables = _run(tiny_gqa, KVCompressionConfig("xquant_cl,streaming", budget=BUDGET,
                                                                     latent_bits=3, group_size=32))
    assert tables == ref_tables
    assert all(length * 4 <= BUDGET + 4 for step in tables for _, length in step.values())
    assert all(len(t) == 10 for t in tokens) and all(torch.isfinite(x).all() for x in logits)
