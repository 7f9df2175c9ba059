"""XQuant and XQuant-CL beyond one RoPE table: Gemma3 (sliding-window layers on the local RoPE, full layers on
the global one, per-head q/k norm) and OLMoE (q/k norm over the whole projection, clipping).

Lossless setting (``latent_bits`` 0) against plain KV on tiny random models, with prompts several times
longer than the sliding window, then decode steps: logits equal within fp32 noise (measured: 4e-6 xquant,
1.4e-6 xquant_cl on logits of magnitude 2.6; OLMoE 2.2e-6). The RoPE tables matter: one table (the global)
on every layer moves the logits by 3.8, checked here too so the equality cannot pass for a reason that
ignores the tables; without the k norm the Gemma logits move by 2.1, without OLMoE's clipping by 4.7 and
without its full-projection k norm by 0.05.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model_harness import build_and_save, compressed_engine, greedy_run
from tierserve.cache.compress.xquant import projection_basis
from tierserve.config import KVCompressionConfig

WINDOW = 8
PROMPT = [int(t) for t in torch.randint(1, 128, (40,), generator=torch.Generator().manual_seed(5))]
# two orthogonal rotations (xquant) or x / s and back with K, V recomputed (xquant_cl), through 3 layers in fp32
ATOL = 1e-4


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from transformers import Gemma3TextConfig

    path = tmp_path_factory.mktemp("gemma3_sliding")
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, head_dim=16,
                           initializer_range=0.1, tie_word_embeddings=False, sliding_window=WINDOW,
                           query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    build_and_save(cfg, str(path), seed=11)
    return str(path)


@pytest.fixture(scope="module")
def gemma_gain(tmp_path_factory):
    """A tiny Gemma3 whose k-norm gains ``1 + w`` span 0.1 .. 5 (the fixture above keeps them near 1)."""
    from transformers import Gemma3TextConfig

    path = str(tmp_path_factory.mktemp("gemma3_gain"))
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, head_dim=32,
                           initializer_range=0.1, tie_word_embeddings=False, sliding_window=WINDOW,
                           query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"])
    model = build_and_save(cfg, path, seed=13)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.copy_(torch.linspace(-0.9, 4.0, 32)[torch.randperm(32, generator=gen)])
    model.save_pretrained(path)
    return path


def _run(folder, kvc, mutate=None):
    engine = compressed_engine(folder, kvc, num_blocks=16, block_size=16, max_num_seqs=1)
    if mutate is not None:
        mutate(engine)
    tokens, logits = greedy_run(engine, [PROMPT], 4)
    return engine, tokens[0], torch.cat(logits)


@pytest.fixture(scope="module")
def gemma_plain(gemma):
    return _run(gemma, KVCompressionConfig())


@pytest.mark.parametrize("method", ["xquant", "xquant_cl"])
def test_lossless_on_gemma3_local_and_global_layers(gemma, gemma_plain, method):
    engine, tokens, logits = _run(gemma, KVCompressionConfig(method, latent_bits=0, group_size=16))
    model = engine.model
    assert [layer.self_attn.sliding_window for layer in model.layers] == [WINDOW, None, WINDOW]
    assert [kv.rope for kv in engine.runner.kv_caches] == [model.local_rope, model.global_rope, model.local_rope]
    assert logits.shape[0] == 4 and len(PROMPT) > 4 * WINDOW
    assert tokens == gemma_plain[1]
    torch.testing.assert_close(logits, gemma_plain[2], rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["xquant", "xquant_cl"])
def test_the_global_table_on_local_layers_is_wrong(gemma, gemma_plain, method):
    """The mutation the test above must catch: every layer re-applying the global RoPE."""
    def global_everywhere(engine):
        for kv in engine.runner.kv_caches:
            kv.rope = engine.model.global_rope

    _, _, logits = _run(gemma, KVCompressionConfig(method, latent_bits=0, group_size=16), global_everywhere)
    assert float((logits - gemma_plain[2]).abs().max()) > 100 * ATOL


@pytest.mark.parametrize("method", ["xquant", "xquant_cl"])
def test_lossless_with_full_qk_norm_and_clipping(tmp_path, method):
    """OLMoE normalises q and k over the whole projection and clips q, k and v: both repeated on the
    rematerialised K and V (the clip at 0.5 binds: the largest |K| before clipping is above it). The k norm's
    gains are spread over 0.1 .. 5: xquant's key basis is the SVD of ``diag(w) W_k`` (w over the whole
    projection), its latent channel j carrying singular value j of that matrix (numpy's, from the checkpoint)."""
    from transformers import OlmoeConfig

    cfg = OlmoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, initializer_range=0.1,
                      num_experts=4, num_experts_per_tok=2, clip_qkv=0.5)
    model = build_and_save(cfg, str(tmp_path), seed=12)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.copy_(torch.linspace(0.1, 5.0, 32)[torch.randperm(32, generator=gen)])
    model.save_pretrained(str(tmp_path))
    _, plain_tokens, plain = _run(str(tmp_path), KVCompressionConfig())
    engine, tokens, logits = _run(str(tmp_path), KVCompressionConfig(method, latent_bits=0, group_size=16))
    attn = engine.model.layers[0].self_attn
    assert attn.qk_norm == "full" and attn.clip == 0.5
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain, rtol=0, atol=ATOL)
    if method == "xquant":
        for (wk, w), kv in zip(_checkpoint_keys(str(tmp_path)), engine.runner.kv_caches):
            m = (w[:, None] * wk).numpy().T
            cols = (torch.from_numpy(m) @ kv.basis_k.double().T).norm(dim=0).numpy()
            np.testing.assert_allclose(cols, np.linalg.svd(m, compute_uv=False), rtol=1e-4)


def _checkpoint_keys(folder: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, ``W_k`` and the k norm's weight ``w`` as the checkpoint stores them (read with safetensors, not
    through the engine's loader), float64."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "model.safetensors"))
    n = len({k.split(".")[2] for k in state if k.startswith("model.layers.")})
    return [(state[f"model.layers.{i}.self_attn.k_proj.weight"].double(),
             state[f"model.layers.{i}.self_attn.k_norm.weight"].double()) for i in range(n)]


def _folded_key_singular_values(wk: torch.Tensor, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(diag(1 + w) W_k)^T of the k norm's gain ``1 + w`` (per head, repeated over the KV heads) and the
    projection, and its singular values (numpy)."""
    m = ((1 + w).repeat(wk.shape[0] // w.numel())[:, None] * wk).numpy().T
    return m, np.linalg.svd(m, compute_uv=False)


def test_key_basis_folds_the_k_norm_gain(gemma_gain):
    """Gemma3 stores ``k_norm(x W_k^T) = diag(1 + w) W_k x / rms``: the latent basis is the SVD of
    ``diag(1 + w) W_k``, so latent channel j of the stored key carries singular value S_j of the matrix the key
    really applies (descending, numpy's). The basis of W_k alone (before the fold) gives column norms that
    are neither these nor sorted (checked). Lossless with it (logits equal plain KV)."""
    _, plain_tokens, plain = _run(gemma_gain, KVCompressionConfig())
    engine, tokens, logits = _run(gemma_gain, KVCompressionConfig("xquant", latent_bits=0, group_size=16))
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain, rtol=0, atol=ATOL)
    for (wk, w), kv in zip(_checkpoint_keys(gemma_gain), engine.runner.kv_caches):
        m, sv = _folded_key_singular_values(wk, w)
        cols = (torch.from_numpy(m) @ kv.basis_k.double().T).norm(dim=0).numpy()
        np.testing.assert_allclose(cols, sv, rtol=1e-4)
        unfolded = projection_basis(wk).double()
        old = (torch.from_numpy(m) @ unfolded.T).norm(dim=0).numpy()
        assert np.abs(old - sv).max() > 0.1 * sv[0] and (np.diff(old) > 0).any()
