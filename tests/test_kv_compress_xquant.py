"""XQuant KV storage (cache/compress/xquant.py): the latent basis, the RoPE inverse, and the engine on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_harness import compressed_engine, greedy_run
from tierserve.cache.compress.base import build_compressor
from tierserve.cache.compress.xquant import apply_rope as xquant_rope
from tierserve.cache.compress.xquant import projection_basis, unrope
from tierserve.cache.tiers.chunk_layout import ChunkLayout
from tierserve.config import KVCompressionConfig
from tierserve.errors import InvalidParameterError
from tierserve.kernels.kv_spec import KVSpec
from tierserve.models.rope import apply_rope
from tierserve.sampling_params import SamplingParams

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering")


def test_rope_copy_and_inverse():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8)
    angle = torch.randn(5, 1, 4)
    cos, sin = angle.cos() * 1.3, angle.sin() * 1.3  # a yarn-like attention_scaling
    assert torch.equal(xquant_rope(x, cos, sin), apply_rope(x, cos, sin))
    torch.testing.assert_close(unrope(apply_rope(x, cos, sin), cos, sin), x, rtol=0, atol=1e-6)


def test_basis_orders_the_latent_by_singular_value():
    """``W^T B^T = U S``: column j of the latent map has norm S_j (numpy's singular values, sign-free)."""
    torch.manual_seed(1)
    w = torch.randn(24, 40)
    b = projection_basis(w)
    torch.testing.assert_close(b @ b.T, torch.eye(24), rtol=0, atol=1e-5)
    s = np.linalg.svd(w.double().numpy().T, compute_uv=False)
    torch.testing.assert_close((w.T @ b.T).norm(dim=0).double(), torch.from_numpy(s), rtol=1e-5, atol=0)
    with pytest.raises(InvalidParameterError, match="hidden size >= .* 8 < 24"):
        projection_basis(torch.randn(24, 8))


def _run(folder, kvc, max_tokens=6):
    engine = compressed_engine(folder, kvc, num_blocks=48, block_size=16, max_num_seqs=1, linear_backend="torch")
    tokens, logits = greedy_run(engine, [engine.tokenize(TEXT)], max_tokens)
    return engine, tokens[0], torch.cat(logits)


@pytest.fixture(scope="module")
def plain(smollm_folder):
    return _run(smollm_folder, KVCompressionConfig())


def test_lossless_latent_equals_plain_kv(smollm_folder, plain):
    engine, tokens, logits = _run(smollm_folder, KVCompressionConfig("xquant", latent_bits=0))
    assert tokens == plain[1]
    # two orthogonal rotations of 192 channels plus the RoPE round trip, in fp32: measured 4.4e-5 on logits of
    # magnitude ~29 (1.5e-6 relative, a few ulps per operation through 30 layers)
    torch.testing.assert_close(logits, plain[2], rtol=0, atol=2e-4)
    # latent in fp32 (K and V, 192 each) plus 4 bytes per token for the position
    assert engine.kv_compressor.page_size_bytes() == 16 * (30 * 2 * 192 * 4 + 4)


def test_lossless_latent_over_packed_weights(smollm_gguf):
    """The GGUF kept packed (Q4_1 int4 kernels): the bases come from the projection module's own output on the
    identity, so the latent stays exact for the weights the model really applies. Compared on layer 0's pages
    after one prefill, where both engines saw identical inputs: the packed kernels round activations to bf16, so
    a 1e-6 difference in a later layer's input can flip a bf16 rounding (one ulp, 0.06 at magnitude 15) and
    whole-model logits are not a fp32-noise comparison."""
    engines = []
    for kvc in (KVCompressionConfig(), KVCompressionConfig("xquant", latent_bits=0)):
        engine = compressed_engine(smollm_gguf, kvc, num_blocks=8, block_size=16, quantization="auto",
                                   enable_prefix_caching=False)
        ids = engine.tokenize(TEXT)[:30]
        engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
        engine.step()
        engines.append(engine)
    plain, xq = engines
    assert type(xq.model.layers[0].self_attn.qkv_proj).__name__ != "Linear"  # really packed
    keys, vals = xq.runner.kv_caches[0].gather(torch.tensor([[0, 1]]))
    pages = plain.runner.kv_caches[0]
    ref_k, ref_v = pages.k[:2].reshape(1, 32, 3, 64), pages.v[:2].reshape(1, 32, 3, 64)
    # fp32 rotations of 192 channels and the RoPE round trip: ~1e-6 relative on |K| <= ~10 (measured 8.6e-6)
    torch.testing.assert_close(keys[:, :30], ref_k[:, :30], rtol=0, atol=5e-5)
    torch.testing.assert_close(vals[:, :30], ref_v[:, :30], rtol=0, atol=5e-5)


def test_four_bit_latent_bytes_and_error(smollm_folder, plain):
    engine, tokens, logits = _run(smollm_folder, KVCompressionConfig("xquant"), max_tokens=2)
    kv4 = build_compressor(KVCompressionConfig("kv4"), engine.model.kv_spec(16))
    assert engine.kv_compressor.page_size_bytes() == kv4.page_size_bytes() + 16 * 4
    p, q = torch.log_softmax(plain[2][0], -1), torch.log_softmax(logits[0], -1)
    kl = float((p.exp() * (p - q)).sum())
    # measured 0.0037 on this prompt (kv4: 0.020; without the in-group Hadamard 0.028): the rotation spreads a
    # token's outlier latent channel over its group (xquant.py, Quantization)
    assert kl < 0.01, kl
    assert tokens[0] == plain[1][0]


def test_pages_move_through_chunk_layout_with_positions():
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4)
    comp = build_compressor(KVCompressionConfig("xquant"), spec)
    caches = comp.allocate_cache(num_blocks=6)
    torch.manual_seed(3)
    for part in [p for c in caches for p in c.parts()]:
        part.copy_(torch.randint(0, 100, part.shape).to(part.dtype))
    layout = ChunkLayout(caches, chunk_blocks=2)
    assert layout.block_bytes == comp.page_size_bytes()  # the position is counted once, in layer 0
    fresh = comp.allocate_cache(num_blocks=6)
    ChunkLayout(fresh, chunk_blocks=2).scatter(layout.gather([4, 1]), 0, [0, 5])
    for c, f in zip(caches, fresh):
        for a, b in zip(c.parts(), f.parts()):
            assert torch.equal(b[[0, 5]], a[[4, 1]])


def test_refusals_name_the_limit():
    with pytest.raises(InvalidParameterError, match="kv_latent_bits.*4 or 0"):
        KVCompressionConfig("xquant", latent_bits=8)
    with pytest.raises(InvalidParameterError, match="kv_latent_bits.*only xquant"):
        KVCompressionConfig("kv4", latent_bits=0)
    with pytest.raises(InvalidParameterError, match="kv_group_size.*KV width 48"):
        build_compressor(KVCompressionConfig("xquant", group_size=32), KVSpec(2, 3, 16, 4))
    from tierserve.kernels.attention.pages import page_view

    comp = build_compressor(KVCompressionConfig("xquant", latent_bits=0), KVSpec(2, 2, 16, 4))
    layer = comp.allocate_cache(4)[0]
    with pytest.raises(InvalidParameterError, match="attention_backend.*XQuantLayerKV pages need"):
        page_view(layer)  # the triton kernels read plain or kv4 pages in place, never a latent
    # Gemma3's local and global tables: tests/test_kv_compress_xquant_models.py
    with pytest.raises(InvalidParameterError, match=r"kv_compression: xquant needs a decoder with a RoPE table "
                                                    r"per attention layer .* Linear has neither"):
        comp.bind(torch.nn.Linear(2, 2), comp.allocate_cache(4))
