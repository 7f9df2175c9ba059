"""The engine on the real SmolLM2-135M against transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from tierserve import SamplingParams
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.context import ForwardContext
from tierserve.models.loader import load_model

PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "def fibonacci(n):\n    ",
]


def _our_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    spec = model.kv_spec(block_size)
    nb = spec.blocks_for_tokens(len(ids))
    kv = allocate_kv_cache(spec, nb + 3)
    table = list(range(nb + 2, 2, -1))[:nb]  # non-contiguous, reversed pages
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [table], block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), ForwardContext(meta, kv))
        return model.compute_logits(hidden)


@pytest.mark.parametrize("source", ["gguf", "folder"])
def test_logits_match_transformers(source, smollm_gguf, smollm_folder, hf_smollm):
    hf, tok = hf_smollm
    ours = load_model(smollm_gguf if source == "gguf" else smollm_folder).model
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0]
        diff = (_our_logits(ours, ids) - ref).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def test_greedy_32_tokens_identical_to_transformers(smollm_llm, hf_smollm):
    hf, tok = hf_smollm
    # min_tokens masks eos exactly as transformers' min_new_tokens does
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0)
    outs = smollm_llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              min_new_tokens=32)[0, len(ids):].tolist()
        assert out.token_ids == ref, prompt


def test_batch_equals_alone(smollm_llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    together = smollm_llm.generate(PROMPTS + ["Once upon a time"] * 3, params)
    for prompt, batched in zip(PROMPTS, together):
        alone = smollm_llm.generate([prompt], params)[0]
        assert alone.token_ids == batched.token_ids


def test_prefix_cache_hit_equals_recompute(smollm_folder):
    from tierserve import LLM

    doc = " ".join(PROMPTS) * 4
    q = doc + " Question: what is the capital of France? Answer:"
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    cached = LLM(smollm_folder, num_blocks=256, block_size=16)
    cached.generate([doc], SamplingParams(max_tokens=1))
    hit = cached.generate([q], params)[0]
    assert hit.num_cached_tokens >= 16 * (len(cached.tokenizer.encode(doc)) // 16 - 1)
    fresh = LLM(smollm_folder, num_blocks=256, block_size=16, enable_prefix_caching=False)
    full = fresh.generate([q], params)[0]
    assert full.num_cached_tokens == 0
    assert hit.token_ids == full.token_ids
    for a, b in zip(hit.logprobs, full.logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-5


def test_cache_storage_never_reallocated(smollm_llm):
    engine = smollm_llm.engine
    ptrs = [(kv.k.data_ptr(), kv.v.data_ptr()) for kv in engine.runner.kv_caches]
    table_ptr = engine.runner.block_tables.table.data_ptr()
    engine.add_request("Tell me a story about a dragon.", SamplingParams(max_tokens=40, ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert [(kv.k.data_ptr(), kv.v.data_ptr()) for kv in engine.runner.kv_caches] == ptrs
        assert engine.runner.block_tables.table.data_ptr() == table_ptr
    assert steps >= 40
