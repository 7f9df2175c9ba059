"""Speculative decoding (ngram) in the engine on the real SmolLM2-135M: greedy output is token-identical.

The reference is the same engine without speculation (conftest ``smollm_llm``).
The speculative engine has a 64-token step budget, so prompts prefill in
chunks beside decodes, and prefix caching is on (two prompts share their
first blocks): speculation must compose with both. Preemption with drafts
is covered exactly in tests/test_spec_scheduler.py. The
acceptance counters are checked against a replay of the proposer over the
reference tokens (greedy: a draft is accepted iff it equals the reference
continuation).
"""

from __future__ import annotations

import pytest

from tierserve import LLM, SamplingParams
from tierserve.config import EngineConfig, SpeculativeConfig
from tierserve.engine.llm import build_engine_config
from tierserve.engine.spec_decode.gate import DraftGate
from tierserve.engine.spec_decode.ngram import NgramProposer
from tierserve.errors import InvalidParameterError

PASSAGE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
           "must be in want of a wife. However little known the feelings or views of such a man may be on "
           "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
           "families, that he is considered the rightful property of some one or other of their daughters.")
QUOTE = f"{PASSAGE}\n\n{PASSAGE}\n\n{PASSAGE[:60]}"
NORMAL = "The capital of France is"
K = 4


@pytest.fixture(scope="module")
def spec_llm(smollm_folder):
    return LLM(smollm_folder, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64,
               speculative="ngram", num_speculative_tokens=K)


@pytest.fixture(scope="module")
def quote_ref(smollm_llm):
    (ref,) = smollm_llm.generate(QUOTE, greedy(24, ignore_eos=True))
    return ref


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def same(a, b):
    assert [(o.token_ids, o.text, o.finish_reason) for o in a] == [(o.token_ids, o.text, o.finish_reason)
                                                                   for o in b]


def test_greedy_batch_one_identical_and_counters_exact(spec_llm, smollm_llm, quote_ref):
    for prompt, n in ((QUOTE, 24), (NORMAL, 12)):
        params = greedy(n, ignore_eos=True)
        (ref,) = [quote_ref] if prompt is QUOTE else smollm_llm.generate(prompt, params)
        before = spec_llm.engine.spec_decode_stats()
        (out,) = spec_llm.generate(prompt, params)
        after = spec_llm.engine.spec_decode_stats()
        assert out.token_ids == ref.token_ids and out.text == ref.text and len(out.token_ids) == n
        drafts, draft_tokens, accepted, per_pos = replay(ref.prompt_token_ids, ref.token_ids, n)
        assert (after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                after.num_accepted_tokens - before.num_accepted_tokens) == (drafts, draft_tokens, accepted)
        got = [a - (before.accepted_per_position[i] if i < len(before.accepted_per_position) else 0)
               for i, a in enumerate(after.accepted_per_position)]
        assert got[:len(per_pos)] == per_pos and not any(got[len(per_pos):])
        if prompt is QUOTE:
            assert accepted >= 12, accepted  # the quote is copied: most drafts hold


def replay(prompt: list[int], ref: list[int], max_tokens: int, backoff: bool = False):
    """The engine's verification steps on the reference tokens: (verifications, drafts, accepted, per position).
    With ``backoff`` the draft gate (gate.py, exact tests in tests/test_spec_gate.py) is replayed as the
    engine runs it."""
    prop, gate = NgramProposer(), DraftGate() if backoff else None
    n, drafts, draft_tokens, accepted, per_pos = 1, 0, 0, 0, [0] * K
    while n < len(ref):
        k = min(K, max_tokens - n - 1)
        d = prop.propose(prompt + ref[:n], k) if k >= 1 and (gate is None or gate.allow()) else []
        if not d:
            n += 1
            continue
        a = 0
        while a < len(d) and d[a] == ref[n + a]:
            a += 1
        drafts, draft_tokens, accepted = drafts + 1, draft_tokens + len(d), accepted + a
        if gate is not None:
            gate.record(a)
        for i in range(a):
            per_pos[i] += 1
        n += a + 1
    return drafts, draft_tokens, accepted, [c for c in per_pos if c]


def test_greedy_batch_of_three_with_stop_string(spec_llm, smollm_llm, quote_ref):
    stop = quote_ref.text[len(quote_ref.text) // 2:][:12].strip()  # a piece of the reference continuation
    prompts = [QUOTE, NORMAL, PASSAGE + "\n\n" + PASSAGE[:100]]
    params = [greedy(24, ignore_eos=True, stop=[stop]), greedy(10), greedy(20, ignore_eos=True)]
    ref = smollm_llm.generate(prompts, params)
    engine = spec_llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs = {rid: [] for rid in ids}
    finish = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
            if o.finished:
                finish[o.request_id] = o.finish_reason
    for r, rid in zip(ref, ids):
        assert [t for o in outs[rid] for t in o.new_token_ids] == r.token_ids
        assert "".join(o.new_text for o in outs[rid]) == r.text and finish[rid] == r.finish_reason
    assert ref[0].finish_reason == "stop" and stop not in ref[0].text and len(ref[0].token_ids) < 24
    assert len(ref[2].token_ids) == 20 and engine.kv_manager.num_free_blocks == engine.num_blocks


def test_sampled_requests_respect_max_tokens_and_stop(spec_llm):
    params = [SamplingParams(max_tokens=9, temperature=0.8, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=0.8, seed=3, stop=["wife"], ignore_eos=True)]
    outs = spec_llm.generate([QUOTE] * 2, params)
    assert len(outs[0].token_ids) == 9
    assert len(outs[1].token_ids) <= 14 and "wife" not in outs[1].text


def test_options_and_errors():
    assert EngineConfig().speculative == SpeculativeConfig()
    cfg = build_engine_config(None, speculative="ngram", num_speculative_tokens=16)
    assert (cfg.speculative.method, cfg.speculative.num_speculative_tokens) == ("ngram", 16)
    with pytest.raises(InvalidParameterError, match="num_speculative_tokens"):
        build_engine_config(None, speculative="ngram", num_speculative_tokens=17)
    with pytest.raises(InvalidParameterError, match="speculative.*streaming"):
        build_engine_config(None, speculative="ngram", kv_compression="streaming", kv_budget=64)
    build_engine_config(None, speculative="ngram", kv_compression="kv4")  # packed pages are allowed


def test_async_engine_reports_the_speculative_counters(spec_llm):
    """The server reads spec stats through AsyncLLMEngine (its /metrics); they are the engine's own counters."""
    import asyncio

    from tierserve.engine.async_engine import AsyncLLMEngine

    async def run():
        eng = AsyncLLMEngine(engine=spec_llm.engine)
        before = eng.spec_decode_stats()
        async for out in eng.generate(QUOTE, greedy(8, ignore_eos=True)):
            pass
        return before, eng.spec_decode_stats(), spec_llm.engine.spec_decode_stats()

    before, after, direct = asyncio.run(run())
    assert after == direct and after.method == "ngram" and after.num_drafts > before.num_drafts


def test_draft_backoff_keeps_greedy_output_and_pauses_as_replayed(smollm_folder, smollm_llm):
    """With the back-off on, output is unchanged and the counters follow the gate's replay, which proposes less."""
    llm = LLM(smollm_folder, num_blocks=64, max_num_seqs=8, speculative="ngram", num_speculative_tokens=K,
              draft_backoff=True)
    params = greedy(40, ignore_eos=True)
    (ref,) = smollm_llm.generate(NORMAL, params)
    (out,) = llm.generate(NORMAL, params)
    st = llm.engine.spec_decode_stats()
    assert out.token_ids == ref.token_ids
    drafts, draft_tokens, accepted, _ = replay(ref.prompt_token_ids, ref.token_ids, 40, backoff=True)
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == (drafts, draft_tokens, accepted)
    assert drafts < replay(ref.prompt_token_ids, ref.token_ids, 40)[0]  # the gate paused some proposals
