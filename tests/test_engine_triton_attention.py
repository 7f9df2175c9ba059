"""The engine with its triton attention backend (kernels under TRITON_INTERPRET=1 on the CPU, compiled on CUDA)
gives the same greedy tokens as the torch reference backend on the real SmolLM2: decode, chunked prefill
(a 16-token budget cuts the prompts) and a prefix-cache hit (the second prompt shares the first's prefix)."""

from __future__ import annotations

import pytest
import torch

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams

PROMPTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
           "It is a truth universally acknowledged, that a single man in possession of a good fortune must be"]


def _greedy_tokens(folder, backend: str, device: str) -> list[list[int]]:
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype="float32", attention_backend=backend),
                                 cache=CacheConfig(num_blocks=64, block_size=16), device=device,
                                 scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16)))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for prompt in PROMPTS:  # one after the other: the second request hits the first's cached blocks
        rid = eng.add_request(prompt, params)
        while eng.has_unfinished():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert out[rid]
    eng.close()
    return list(out.values())


def test_triton_attention_engine_matches_torch_on_cpu(smollm_folder):
    assert _greedy_tokens(smollm_folder, "triton", "cpu") == _greedy_tokens(smollm_folder, "torch", "cpu")


@pytest.mark.cuda
def test_triton_attention_engine_on_cuda_matches_cpu_fp32(smollm_folder):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert _greedy_tokens(smollm_folder, "triton", "cuda") == _greedy_tokens(smollm_folder, "torch", "cpu")
