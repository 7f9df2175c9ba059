"""Where generation ends, and the async engine's failure paths, on the real SmolLM2.

References are the same model's greedy runs with ``ignore_eos`` and no stop rule (``smollm_llm``), and
token ids read from the model's own tokenizer: a stop must cut that run at the first stop token, no
earlier, no later.

- EOS: a chat answer ends at the model's eos id (kept as the last token id, left out of the text),
  finish reason "stop"; with ``ignore_eos`` the run goes on to ``max_tokens``.
- ``stop_token_ids``: the cut at the first occurrence of a chosen id (kept, reason "stop"); with
  ``min_tokens`` past that occurrence the id is masked there and the run ends by length.
- ``max_model_len``: an engine built with ``max_model_len=48`` stops a 37-token prompt after 11 tokens
  ("length"), however large ``max_tokens`` is; a 47-token prompt gets 1 token.
- ``AsyncLLMEngine``: an exception raised inside a step (a step hook that fails once) reaches every
  request in flight as that exception, the engine is left with no request and every page free, and the
  loop serves the next request exactly; ``close()`` with streams in flight ends each of them with an
  error (no consumer is left waiting) and frees their pages.
"""

from __future__ import annotations

import asyncio

import pytest

from tierserve import LLM, SamplingParams
from tierserve.engine.async_engine import AsyncLLMEngine
from tierserve.step.hooks import StepHook


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(scope="module")
def chat(smollm_llm):
    """(prompt ids, the greedy ignore_eos run of 16 tokens, the tokenizer's eos id)."""
    ids = _chat_ids(smollm_llm.tokenizer, "What is 2+2?")
    base = smollm_llm.generate([ids], _greedy(16, ignore_eos=True))[0]
    return ids, list(base.token_ids), smollm_llm.tokenizer.eos_token_id


@pytest.fixture(scope="module")
def short_llm(smollm_folder):
    return LLM(smollm_folder, max_model_len=48, num_blocks=32, max_num_seqs=4)


def test_eos_ends_the_answer(smollm_llm, chat):
    ids, base, eos = chat
    assert eos in base and base.index(eos) < 15  # the model answers, then emits eos
    cut = base.index(eos) + 1
    out = smollm_llm.generate([ids], _greedy(16))[0]
    assert out.finish_reason == "stop"
    assert list(out.token_ids) == base[:cut]  # eos kept as the last id
    assert out.text == smollm_llm.tokenizer.decode(base[:cut - 1], skip_special_tokens=True)
    ignored = smollm_llm.generate([ids], _greedy(16, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and list(ignored.token_ids) == base


def test_stop_token_ids_cut_at_the_first_occurrence(smollm_llm, chat):
    ids, base, _ = chat
    stop = base[4]
    first = base.index(stop)
    assert base.count(stop) == 1
    out = smollm_llm.generate([ids], _greedy(16, ignore_eos=True, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and list(out.token_ids) == base[:first + 1]
    # min_tokens beyond that occurrence: the stop id is masked until then (as transformers' min_new_tokens
    # does), so the run agrees up to it, takes another token there, and ends by length
    late = smollm_llm.generate([ids], _greedy(16, ignore_eos=True, stop_token_ids=[stop],
                                              min_tokens=first + 2))[0]
    assert late.finish_reason == "length" and len(late.token_ids) == 16
    assert list(late.token_ids[:first]) == base[:first] and late.token_ids[first] != stop


def test_max_model_len_cuts_the_sequence(short_llm, chat):
    ids, base, _ = chat
    assert len(ids) == 37 and short_llm.engine.max_model_len == 48
    out = short_llm.generate([ids], _greedy(1000, ignore_eos=True))[0]
    assert out.finish_reason == "length" and list(out.token_ids) == base[:48 - 37]
    longer = ids + base[:10]  # 47 tokens: room for one
    one = short_llm.generate([longer], _greedy(1000, ignore_eos=True))[0]
    assert one.finish_reason == "length" and list(one.token_ids) == [base[10]]


class _FailAtStep(StepHook):
    """A step hook whose ``before_forward`` raises once, at its ``at``-th call (a subsystem failing)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def before_forward(self, sched, requests) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("step failed on purpose")


def test_async_step_error_reaches_every_request_and_the_loop_survives(short_llm, chat):
    engine = short_llm.engine
    ids, base, _ = chat
    prompts = [ids[:20], ids[:25], ids[:30]]
    hook = _FailAtStep(at=3)
    engine.hooks.append(hook)

    async def consume(aengine, prompt):
        got = []
        try:
            async for out in aengine.generate(prompt, _greedy(8, ignore_eos=True)):
                got.extend(out.new_token_ids)
        except RuntimeError as exc:
            return got, exc
        return got, None

    async def run():
        aengine = AsyncLLMEngine(engine=engine)
        try:
            results = await asyncio.wait_for(asyncio.gather(*(consume(aengine, p) for p in prompts)), 120)
            after = [t async for out in aengine.generate(ids, _greedy(5, ignore_eos=True))
                     for t in out.new_token_ids]
            return results, after
        finally:
            engine.hooks.remove(hook)
            await aengine.close()

    results, after = asyncio.run(run())
    assert hook.calls >= 3
    for got, exc in results:
        assert exc is not None and str(exc) == "step failed on purpose"
        assert len(got) < 8
    assert not engine.has_unfinished() and engine.kv_manager.num_free_blocks == engine.num_blocks
    assert after == base[:5]  # the loop survived and computes exactly


def test_async_close_with_streams_in_flight_ends_them(short_llm, chat):
    engine = short_llm.engine
    ids, _, _ = chat

    async def run():
        aengine = AsyncLLMEngine(engine=engine)
        started = asyncio.Event()
        counts = [0, 0]

        async def consume(i, prompt):
            try:
                async for _ in aengine.generate(prompt, _greedy(40, ignore_eos=True)):
                    counts[i] += 1
                    if all(counts):
                        started.set()
            except RuntimeError as exc:
                return exc
            return None

        tasks = [asyncio.ensure_future(consume(i, p)) for i, p in enumerate((ids[:10], ids[:12]))]
        await asyncio.wait_for(started.wait(), 120)
        await aengine.close()
        # no consumer is left waiting: each ends (with the closed-engine error) well within the deadline
        return await asyncio.wait_for(asyncio.gather(*tasks), 60), counts

    errors, counts = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) and "closed" in str(e) for e in errors), errors
    assert all(0 < c < 38 for c in counts), counts  # they were cut mid-stream
    assert not engine.has_unfinished() and engine.kv_manager.num_free_blocks == engine.num_blocks
