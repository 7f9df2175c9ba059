"""EngineConfig.seed: the engine's generator samples every request without a seed of its own, so two engines
with the same seed give the same sampled tokens, and a request's own seed still wins over it."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from model_harness import build_and_save
from tierserve.config import CacheConfig, EngineConfig, ModelConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams
from tierserve.tools.random_model import word_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_seed"))
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    build_and_save(cfg, path, seed=5, noise=1.0)  # large noise: a flat-ish distribution, so samples differ
    word_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def _sample(path, engine_seed, request_seed=None) -> list[list[int]]:
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=path), cache=CacheConfig(num_blocks=32), seed=engine_seed))
    params = SamplingParams(max_tokens=24, temperature=1.5, ignore_eos=True, seed=request_seed)
    ids = [eng.add_request([5, 6, 7, 8 + i], params) for i in range(3)]
    out = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[i] for i in ids]


def test_engine_seed_makes_unseeded_sampling_repeatable(tiny):
    first = _sample(tiny, 7)
    assert _sample(tiny, 7) == first
    assert _sample(tiny, 8) != first


def test_request_seed_wins_over_the_engine_seed(tiny):
    assert _sample(tiny, 7, request_seed=3) == _sample(tiny, 8, request_seed=3)
