"""XQuant-CL KV storage (cache/compress/xquant_cl.py): bit packing, the error-feedback chain, the per-layer rule
(latents on the first half, one delta chain on the second) and its bytes, the engine on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from model_harness import compressed_engine, greedy_run
from tierserve.cache.compress.base import build_compressor
from tierserve.cache.compress.xquant import XQuantLayerKV
from tierserve.cache.compress.delta_pages import DeltaPages, dequantize, pack_bits, quantize, unpack_bits
from tierserve.cache.compress.xquant_cl import XQuantCLLayerKV, delta_layers
from tierserve.cache.tiers.chunk_layout import ChunkLayout
from tierserve.config import KVCompressionConfig
from tierserve.errors import InvalidParameterError
from tierserve.kernels.kv_spec import KVSpec

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bits_matches_a_bit_string(bits):
    """Against a brute-force bit string: code j's bit i is bit j*b+i of the row, bytes little-endian."""
    torch.manual_seed(bits)
    q = torch.randint(0, 1 << bits, (3, 16), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape == (3, 16 * bits // 8)
    for r in range(3):
        stream = "".join(format(int(c), f"0{bits}b")[::-1] for c in q[r])  # LSB first
        ref = [int(stream[8 * i:8 * i + 8][::-1], 2) for i in range(len(stream) // 8)]
        assert packed[r].tolist() == ref
    assert torch.equal(unpack_bits(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codec_levels_and_error_bound(bits):
    torch.manual_seed(0)
    x = torch.randn(40, 64) * 3
    q, scale = quantize(x, bits, 16)
    assert int(q.max()) == (1 << bits) - 1 and int(q.min()) == 0  # every level used at the extremes
    err = (dequantize(q, scale, bits, 16) - x).abs().reshape(40, 4, 16)
    step = x.reshape(40, 4, 16).abs().amax(-1) / ((1 << (bits - 1)) - 0.5)
    # half a step, plus the fp16 rounding of the step (relative 2^-11) over at most 2^(b-1) steps
    bound = step / 2 + step * (1 << (bits - 1)) * 2 ** -11
    assert (err <= bound[..., None] + 1e-6).all()
    # the levels are symmetric: -x is coded as the mirror image of x
    torch.testing.assert_close(dequantize(*quantize(-x, bits, 16), bits, 16), -dequantize(q, scale, bits, 16))


def test_error_feedback_keeps_the_error_at_one_rounding():
    """A slowly drifting stream (as the residual stream across layers): each stored delta is against the
    reconstruction, so the error at layer L stays that of one rounding; storing the deltas of the true inputs
    instead (no feedback) adds up L independent roundings (a random walk, ~sqrt(L) times larger)."""
    torch.manual_seed(1)
    layers, tokens, hidden = 24, 8, 64
    u = torch.cumsum(torch.randn(layers, tokens, hidden) * 0.3, 0) + torch.randn(tokens, hidden) * 3
    slots = torch.arange(tokens)

    def chain(feedback: bool) -> tuple[list[float], torch.Tensor]:
        pages = [DeltaPages(1, tokens, hidden, 4 if i == 0 else 2, 32, "cpu") for i in range(layers)]
        prev, errs = torch.zeros(tokens, hidden), []
        for i in range(layers):
            prev = prev + pages[i].write(slots, u[i] - (prev if feedback else (u[i - 1] if i else 0)))
            errs.append(float((prev - u[i]).pow(2).mean().sqrt()))
        stored = sum(p.read(torch.tensor([0])) for p in pages)
        torch.testing.assert_close(stored, prev, rtol=0, atol=1e-5)  # the pages give back the chain
        return errs, prev

    fed, _ = chain(True)
    naive, _ = chain(False)
    assert max(fed[1:]) <= 1.5 * fed[1]
    assert naive[-1] > 2.5 * fed[-1]


def _run(folder, kvc, max_tokens=6):
    engine = compressed_engine(folder, kvc, num_blocks=48, block_size=16, max_num_seqs=1, linear_backend="torch")
    tokens, logits = greedy_run(engine, [engine.tokenize(TEXT)], max_tokens)
    return engine, tokens[0], torch.cat(logits)


@pytest.fixture(scope="module")
def plain(smollm_folder):
    return _run(smollm_folder, KVCompressionConfig(), max_tokens=3)


def test_lossless_deltas_equal_plain_kv(smollm_folder, plain):
    engine, tokens, logits = _run(smollm_folder, KVCompressionConfig("xquant_cl", latent_bits=0), max_tokens=3)
    assert tokens == plain[1]
    # x / s and back, deltas summed over 30 layers and K, V recomputed from the sum, all fp32
    torch.testing.assert_close(logits, plain[2], rtol=0, atol=2e-4)
    # layers 0-14: fp32 latent K and V (2 x 192 wide); 15-29: fp32 deltas (576 wide); 4 bytes of position
    assert engine.kv_compressor.page_size_bytes() == 16 * (15 * 2 * 192 * 4 + 15 * 576 * 4 + 4)


@pytest.mark.slow  # an engine of its own (~10 s); the codec and the chain have the fast tests above
def test_low_bit_deltas_bytes_and_error(smollm_folder, plain):
    engine, tokens, logits = _run(smollm_folder, KVCompressionConfig("xquant_cl", latent_bits=3, group_size=64),
                                  max_tokens=2)
    spec = engine.model.kv_spec(16)
    # layers 0-14: 4-bit latents (kv4's 240 B); layer 15 stores u at 4 bits (288 + 18), 14 layers of 3-bit
    # deltas (216 + 18), 4 bytes of position
    kv4 = build_compressor(KVCompressionConfig("kv4"), spec)
    assert engine.kv_compressor.page_size_bytes() == 16 * (15 * 240 + 306 + 14 * 234 + 4) < kv4.page_size_bytes()
    two_bit = build_compressor(KVCompressionConfig("xquant_cl", latent_bits=2, group_size=64), spec)
    assert two_bit.page_size_bytes() == 16 * (15 * 240 + 306 + 14 * 162 + 4) < 0.86 * kv4.page_size_bytes()
    p, q = torch.log_softmax(plain[2][0], -1), torch.log_softmax(logits[0], -1)
    kl = float((p.exp() * (p - q)).sum())
    # measured 0.02-0.08 on this prompt (kv4: 0.037); 3 bits without the Hadamard rotation and channel weights: 0.09
    assert 1e-4 < kl < 0.15, kl  # (the greedy token can flip: its top two logits are 0.1 apart)


def test_pages_move_through_chunk_layout():
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4, hidden_size=64)
    comp = build_compressor(KVCompressionConfig("xquant_cl", latent_bits=3), spec)
    caches = comp.allocate_cache(num_blocks=6)
    for part in [p for c in caches for p in c.parts()]:
        part.copy_(torch.randint(0, 100, part.shape).to(part.dtype))
    layout = ChunkLayout(caches, chunk_blocks=2)
    # layer 0: 4-bit latent K and V (2 x (16 + 2 x 2)); layer 1: u at 4 bits (32 + 4); layer 2: 3-bit delta
    assert layout.block_bytes == comp.page_size_bytes() == 4 * (2 * (16 + 4) + (32 + 4) + (24 + 4) + 4)
    fresh = comp.allocate_cache(num_blocks=6)
    ChunkLayout(fresh, chunk_blocks=2).scatter(layout.gather([4, 1]), 0, [0, 5])
    for c, f in zip(caches, fresh):
        for a, b in zip(c.parts(), f.parts()):
            assert torch.equal(b[[0, 5]], a[[4, 1]])


def test_refusals_name_the_limit():
    with pytest.raises(InvalidParameterError, match="kv_latent_bits.*4, 3, 2 or 0.*got 1"):
        KVCompressionConfig("xquant_cl", latent_bits=1)
    with pytest.raises(InvalidParameterError, match="kv_latent_bits.*4 or 0.*got 2"):
        KVCompressionConfig("xquant", latent_bits=2)
    with pytest.raises(InvalidParameterError, match="kv_group_size.*hidden size 48 divisible by the group size 32"):
        build_compressor(KVCompressionConfig("xquant_cl"), KVSpec(2, 2, 16, 4, hidden_size=48))
    with pytest.raises(InvalidParameterError, match="kv_compression.*hidden size"):
        build_compressor(KVCompressionConfig("xquant_cl"), KVSpec(2, 2, 16, 4))


@pytest.mark.parametrize("layers, first", [(1, 0), (2, 1), (3, 1), (18, 9), (30, 15), (31, 15)])
def test_delta_layers_are_the_second_half(layers, first):
    """The per-layer rule: XQuant latents below half the depth, one delta chain from there to the last layer
    (its first layer stores u itself at 4 bits, every later one a delta to the layer before it); every page
    byte the storage holds is counted in the page size."""
    assert delta_layers(layers) == tuple(range(first, layers))
    spec = KVSpec(num_layers=layers, num_kv_heads=1, head_dim=32, block_size=4, hidden_size=64)
    comp = build_compressor(KVCompressionConfig("xquant_cl", latent_bits=3, group_size=16), spec)
    caches = comp.allocate_cache(num_blocks=3)
    assert [isinstance(c, XQuantLayerKV) for c in caches] == [i < first for i in range(layers)]
    assert [c.prev for c in caches[first:]] == [None, *range(first, layers - 1)]
    assert [c.pages.bits for c in caches[first:]] == [4] + [3] * (layers - first - 1)
    held = sum(t.nbytes for c in caches for t in c.parts())
    assert held == 3 * comp.page_size_bytes()
    # latent: 2 x (16 codes + 2 fp16 per group of 32); u: 32 codes + 4 scales; delta: 24 + 4 scales
    assert comp.page_size_bytes() == 4 * (first * 2 * (16 + 4) + (32 + 8) + (layers - first - 1) * (24 + 8) + 4)
