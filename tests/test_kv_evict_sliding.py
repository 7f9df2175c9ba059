"""Block eviction on sliding-window models (Gemma3): the tokens inside the window are never evicted.

Attention masks a sliding window by slot and eviction shifts slots against positions, so an eviction
method keeps the last ``W - 1`` tokens (cache/compress/eviction.py). Then a model whose layers all slide
sees exactly the keys it sees without eviction: its logits equal the uncompressed engine's while blocks
really go (and without the protection they do not: checked too, so the equality cannot pass for a
reason that ignores the window). On a model with full layers too, Expected Attention scores only the
full layers, each with its own RoPE table (a candidate's future attention on a sliding layer is 0).
"""

from __future__ import annotations

import math

import pytest
import torch

from model_harness import build_and_save, compressed_engine, greedy_run
from tierserve.cache.compress.base import KV_COMPRESSORS, SeqKV
from tierserve.cache.compress.expected_attention import (averaged_rope_matrix, expected_attention_scores,
                                                          prerope_queries, query_statistics)
from tierserve.config import KVCompressionConfig
from tierserve.kernels.kv_spec import KVSpec
from tierserve.sampling_params import SamplingParams

WINDOW = 8
BLOCK = 4
PROMPT = [int(t) for t in torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(7))]
ENGINE = dict(num_blocks=32, block_size=BLOCK, max_num_seqs=1, max_num_batched_tokens=8,
              long_prefill_token_threshold=8)  # 8-token prefill chunks: eviction acts inside the prompt


def _gemma(path, layer_types, seed):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                           max_position_embeddings=128, head_dim=16, initializer_range=0.1,
                           tie_word_embeddings=False, sliding_window=WINDOW, query_pre_attn_scalar=16,
                           layer_types=layer_types)
    build_and_save(cfg, str(path), seed=seed)
    return str(path)


@pytest.fixture(scope="module")
def all_sliding(tmp_path_factory):
    return _gemma(tmp_path_factory.mktemp("gemma3_all_sliding"), ["sliding_attention"] * 2, seed=13)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return _gemma(tmp_path_factory.mktemp("gemma3_mixed"),
                  ["sliding_attention", "full_attention", "sliding_attention"], seed=14)


def _run(folder, kvc, window=None):
    engine = compressed_engine(folder, kvc, **ENGINE)
    if window is not None:
        engine.kv_compressor.keep_recent(window)
    tokens, logits = greedy_run(engine, [PROMPT], 12)
    evicted = engine.kv_evictor.num_evicted_blocks if engine.kv_evictor is not None else 0
    return tokens[0], torch.cat(logits), evicted


def test_candidates_exclude_the_window():
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=16, block_size=BLOCK)
    comp = KV_COMPRESSORS["streaming"](KVCompressionConfig("streaming", budget=8), spec)
    seq = SeqKV("r", list(range(10)), 38, 38, 38, 8)  # 10 blocks, the last holds 2 tokens
    assert comp.candidates(seq) == list(range(1, 9))
    comp.keep_recent(WINDOW)
    # the last W - 1 = 7 kept tokens are slots 31..37: block 7 (slots 28..31) holds slot 31 and stays
    assert comp.candidates(seq) == list(range(1, 7))
    assert comp.blocks_to_evict(seq) == list(range(1, 7))  # 30 over budget (8 blocks), only 6 may go
    assert comp.candidates(SeqKV("r", [0, 1, 2], 10, 50, 50, 1)) == []


@pytest.mark.parametrize("method", ["streaming", "paged_eviction", "expected_attention"])
def test_all_sliding_model_evicts_and_logits_equal_uncompressed(all_sliding, method):
    plain_tokens, plain, _ = _run(all_sliding, KVCompressionConfig())
    tokens, logits, evicted = _run(all_sliding, KVCompressionConfig(method, budget=8))
    assert evicted >= 4  # 52 tokens, budget 8, the window keeps ~7 + block 0 + the current block
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)


def test_without_the_window_eviction_changes_the_logits(all_sliding):
    """The mutation the test above must catch: eviction inside the window (slots then reach past it)."""
    _, plain, _ = _run(all_sliding, KVCompressionConfig())
    _, logits, evicted = _run(all_sliding, KVCompressionConfig("streaming", budget=8), window=0)
    assert evicted > 0 and float((logits - plain).abs().max()) > 1e-2


def test_kv4_with_eviction_on_sliding_layers_equals_kv4(all_sliding):
    kv4_tokens, kv4, _ = _run(all_sliding, KVCompressionConfig("kv4", group_size=16))
    tokens, logits, evicted = _run(all_sliding, KVCompressionConfig(("kv4", "expected_attention"), budget=8,
                                                                    group_size=16))
    assert evicted >= 4 and tokens == kv4_tokens
    torch.testing.assert_close(logits, kv4, rtol=0, atol=1e-5)


def test_expected_attention_scores_full_layers_with_their_own_rope(mixed):
    """Mixed model: it evicts, and the scores are those of the full layer alone, rotated by the global RoPE
    table (the local one gives other scores)."""
    engine = compressed_engine(mixed, KVCompressionConfig("expected_attention", budget=8), **ENGINE)
    comp, model = engine.kv_compressor, engine.model
    assert comp.recent_window == WINDOW and comp.scored_layers == [1]
    assert comp._ropes == [model.local_rope, model.global_rope, model.local_rope]
    greedy_run(engine, [PROMPT], 12)
    assert engine.kv_evictor.num_evicted_blocks >= 4
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=1, temperature=0.0))
    engine.step()  # a prefill chunk: its attention inputs are buffered (and blocks may go)
    req = engine.get_request(rid)
    kept = req.num_computed_tokens - engine.kv_manager.num_evicted_tokens(rid)
    seq = SeqKV(rid, req.block_ids, kept, req.num_computed_tokens, req.num_prompt_tokens, 8)
    attn = model.layers[1].self_attn
    x = comp.buffered_inputs(rid)[1]
    k, v = comp.gather_layer(1, seq)
    scores = {}
    for name, rope in (("global", model.global_rope), ("local", model.local_rope)):
        n = seq.position
        rope.ensure(n + 512)
        rot = averaged_rope_matrix(rope.cos_table[n:n + 512], rope.sin_table[n:n + 512])
        mu, cov = query_statistics(prerope_queries(attn, x), rot)
        scores[name] = expected_attention_scores(mu, cov, k, v, 4, 1 / math.sqrt(16)).mean(0)
    with torch.inference_mode():
        ours = comp.token_scores(seq)
    torch.testing.assert_close(ours, scores["global"], rtol=1e-9, atol=1e-12)
    assert float((scores["local"] - scores["global"]).abs().max()) > 1e-4
    engine.abort(rid)
