"""KV compression in the real engine on SmolLM2-135M: budgets, equivalence with a large budget, 4-bit KV."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tierserve.config import KVCompressionConfig
from tierserve.engine.llm import build_engine_config
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams

BS = 16
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be on "
        "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
        "families, that he is considered the rightful property of some one or other of their daughters. "
        "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at "
        "last? Mr. Bennet replied that he had not. But it is, returned she; for Mrs. Long has just been "
        "here, and she told me all about it.")


def _engine(folder, kvc: KVCompressionConfig, **kw) -> LLMEngine:
    cfg = build_engine_config(folder, num_blocks=96, block_size=BS, max_num_seqs=4, linear_backend="torch", **kw)
    return LLMEngine(dataclasses.replace(cfg, kv_compression=kvc))


def _run(engine: LLMEngine, prompts, max_tokens: int, check=None):
    """Greedy generation; returns (tokens per request, logits per step) with the runner's raw logits."""
    logits: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(out, requests):  # records the real output, changes nothing
        run = execute(out, requests)
        if run.logits is not None:
            logits.append(run.logits.clone())
        return run

    engine.runner.execute = recording
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        if check is not None:
            check(engine)
    return [tokens[rid] for rid in ids], logits


@pytest.fixture(scope="module")
def prompts(smollm_folder):
    eng = _engine(smollm_folder, KVCompressionConfig())
    ids = eng.tokenize(TEXT)
    return [ids, ids[:97]]  # two lengths, batched decode with different kept counts


@pytest.fixture(scope="module")
def baseline(smollm_folder, prompts):
    return _run(_engine(smollm_folder, KVCompressionConfig()), prompts, 12)


@pytest.mark.parametrize("method", [pytest.param("paged_eviction", marks=pytest.mark.slow), "expected_attention",
                                    pytest.param("streaming", marks=pytest.mark.slow)])
def test_budget_above_context_equals_uncompressed(smollm_folder, prompts, baseline, method):
    eng = _engine(smollm_folder, KVCompressionConfig(method, budget=1024))
    tokens, logits = _run(eng, prompts, 12)
    assert eng.kv_evictor.num_evicted_blocks == 0
    assert tokens == baseline[0]
    assert len(logits) == len(baseline[1])
    for a, b in zip(logits, baseline[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["paged_eviction", "expected_attention", "streaming"])
def test_cache_never_exceeds_budget_plus_one_block(smollm_folder, prompts, baseline, method):
    budget = 48
    eng = _engine(smollm_folder, KVCompressionConfig(method, budget=budget))
    seen = []

    def check(engine):
        for rid in engine.request_ids():
            req = engine.get_request(rid)
            kept = req.num_computed_tokens - engine.kv_manager.num_evicted_tokens(rid)
            assert kept <= budget + BS, (rid, req.num_computed_tokens, kept)
            assert len(req.block_ids) * BS <= budget + BS + BS  # blocks hold kept tokens (+ a partial one)
            assert len(req.block_ids) == -(-kept // BS)
            seen.append(req.num_computed_tokens - kept)

    tokens, logits = _run(eng, prompts, 12, check)
    assert max(seen) >= len(prompts[0]) - budget  # evictions did happen
    assert eng.kv_evictor.num_evicted_blocks > 0
    assert all(len(t) == 12 for t in tokens)
    # the first token is sampled before anything is evicted (eviction follows the step)
    assert [t[0] for t in tokens] == [t[0] for t in baseline[0]]
    # the engine returned every evicted block: after the requests finish the whole pool is free
    assert eng.kv_manager.num_free_blocks == eng.num_blocks


def test_kv4_logits_close_to_fp32(smollm_folder, prompts, baseline):
    eng = _engine(smollm_folder, KVCompressionConfig("kv4"))
    assert eng.kv_compressor.page_size_bytes() * 6.4 == eng.model.kv_spec(BS).page_size_bytes
    tokens, logits = _run(eng, prompts, 12)
    base = torch.cat(baseline[1])
    got = torch.cat(logits[: len(baseline[1])])
    # compare next-token distributions where the inputs are the same: every step of the full prompt (its
    # greedy tokens agree, asserted); the 97-token prompt is cut mid-sentence and its flat first
    # distribution makes its tokens diverge after one step, so its later steps are not comparable
    agree = sum(a == b for a, b in zip(tokens[0], baseline[0][0]))
    # steps up to the first greedy divergence (inclusive) had the same inputs: compare those (12 of 12 agree on
    # an AVX-512 machine; 10 on an AVX2 one, a near-tie at step 11)
    same = next((i for i, (a, b) in enumerate(zip(tokens[0], baseline[0][0])) if a != b), 12)
    assert same >= 9, (tokens[0], baseline[0][0])
    p = torch.log_softmax(base[0::2][:same + 1], -1)
    q = torch.log_softmax(got[0::2][:same + 1], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    print(f"kv4 vs fp32 KV, full prompt, 12 steps: KL mean {kl.mean():.4f} max {kl.max():.4f}")
    # measured: mean 0.018, max 0.029 (AVX-512 machine); mean 0.019, max 0.044 (AVX2); mean 0.027, max 0.060
    # (AVX2, the queries rotated instead of the keys: the same product up to float rounding, which flips
    # some 4-bit codes of later layers; over 8 x 512 held-out tokens both forms give KL 0.0345,
    # benchmarks/kv_formats_quality.py). One prompt's 12 steps move that much with rounding; fp32 KV gives
    # exactly 0. The per-element error of the 4-bit pages is bounded exactly in test_kv_compress_units.py;
    # keys stored without the rotation diverge before step 9 (asserted above)
    assert kl.mean() < 0.04 and kl.max() < 0.09, kl
    assert base[0].argmax() == got[0].argmax()
    # greedy continuations: measured 12 of 12 equal (AVX-512), 10 (AVX2); 4-bit KV is lossy
    assert agree >= 10, (tokens[0], baseline[0][0])


@pytest.fixture(scope="module")
def kv4_run(smollm_folder, prompts):
    return _run(_engine(smollm_folder, KVCompressionConfig("kv4")), prompts, 12)


def test_kv4_with_eviction_above_context_equals_kv4(smollm_folder, prompts, kv4_run):
    """Composed with a budget above the context, nothing is evicted: bitwise the kv4 engine."""
    eng = _engine(smollm_folder, KVCompressionConfig("kv4,expected_attention", budget=1024))
    assert eng.kv_compressor.page_size_bytes() * 6.4 == eng.model.kv_spec(BS).page_size_bytes
    tokens, logits = _run(eng, prompts, 12)
    assert eng.kv_evictor.num_evicted_blocks == 0
    assert tokens == kv4_run[0]
    assert len(logits) == len(kv4_run[1]) and all(torch.equal(a, b) for a, b in zip(logits, kv4_run[1]))


def test_kv4_with_streaming_evicts_like_streaming(smollm_folder, prompts):
    """kv4 + StreamingLLM keeps exactly the blocks StreamingLLM keeps on fp32 pages (its choice does not
    read values), within budget + one block, and its logits stay within kv4's own error of that run."""
    budget = 48

    def tables_of(kvc):
        eng = _engine(smollm_folder, kvc)
        seen = []

        def check(engine):
            seen.append({rid: (engine.get_request(rid).num_computed_tokens,
                               engine.kv_manager.num_evicted_tokens(rid), len(engine.get_request(rid).block_ids))
                         for rid in engine.request_ids()})

        return eng, seen, _run(eng, prompts, 12, check)

    plain, plain_tables, (plain_tokens, plain_logits) = tables_of(KVCompressionConfig("streaming", budget=budget))
    both, both_tables, (tokens, logits) = tables_of(KVCompressionConfig("kv4,streaming", budget=budget))
    assert both.kv_compressor.name == "kv4+streaming"
    assert both.kv_evictor.num_evicted_blocks == plain.kv_evictor.num_evicted_blocks > 0
    # the same evictions at the same steps (with ignore_eos the counts do not depend on the tokens)
    assert both_tables == plain_tables and len(both_tables) >= 12
    for step in both_tables:
        for computed, evicted, blocks in step.values():
            assert computed - evicted <= budget + BS and blocks == -(-(computed - evicted) // BS)
    # first step (the prefill, before any eviction): exactly kv4 alone's logits (the same 4-bit pages)
    _, _, (_, kv4_logits) = tables_of(KVCompressionConfig("kv4"))
    assert torch.equal(logits[0], kv4_logits[0])
    assert all(len(t) == 12 for t in tokens) and tokens[0][0] == plain_tokens[0][0]
    assert both.kv_manager.num_free_blocks == both.num_blocks  # every evicted and finished block returned
