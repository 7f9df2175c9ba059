"""KV compression units, no model: 4-bit KV codec, Expected Attention math, eviction policy, bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from tierserve.cache.compress.base import KV_COMPRESSORS, SeqKV, build_compressor
from tierserve.cache.compress.expected_attention import (averaged_rope_matrix, expected_attention_scores,
                                                          log_expected_scores, query_statistics)
from tierserve.cache.compress.kv4 import PackedLayerKV
from tierserve.kernels.quant.kv4_groups import dequantize_groups, quantize_groups
from tierserve.cache.compress.paged_eviction import value_key_ratio
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.kernels.kv_spec import KVSpec
from tierserve.config import CacheConfig, EngineConfig, KVCompressionConfig
from tierserve.engine.request import Request
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.hadamard import hadamard_matrix
from tierserve.models.rope import apply_rope
from tierserve.sampling_params import SamplingParams

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, block_size=4)


# -- 4-bit KV -------------------------------------------------------------------------------

def test_kv4_round_trip_within_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 64) * torch.linspace(0.1, 8, 64)  # uneven channel ranges
    x[5, 1, 7] = 40.0  # an outlier
    codes, scale, zero = quantize_groups(x, 32)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 3, 32)
    assert scale.dtype == torch.float16 and scale.shape == (64, 3, 2)
    err = (dequantize_groups(codes, scale, zero, 32) - x).abs().reshape(64, 3, 2, 32)
    xg = x.reshape(64, 3, 2, 32)
    lo, hi = xg.amin(-1), xg.amax(-1)
    exact = (hi - lo) / 15
    bound = 0.5 * scale.float() + (lo - zero.float()).abs() + 15 * (scale.float() - exact).abs() + 1e-6
    assert (err.amax(-1) <= bound).all()
    assert err.amax(-1).mean() < 0.6 * exact.mean()  # rounding, not clamping, dominates


def test_kv4_exact_on_grid_and_constant_groups():
    # values already on a 16-level grid with fp16-exact scale and min come back exactly
    q = torch.randint(0, 16, (10, 2, 64)).float()
    q[..., 0], q[..., 31], q[..., 32], q[..., 63] = 0, 15, 0, 15  # every group spans the full range
    x = -1.5 + 0.25 * q
    assert torch.equal(dequantize_groups(*quantize_groups(x, 32), 32), x)
    const = torch.full((3, 1, 64), 2.5)
    assert torch.equal(dequantize_groups(*quantize_groups(const, 32), 32), const)


def test_kv4_packed_pages_match_reference_and_save_memory():
    torch.manual_seed(1)
    comp = build_compressor(KVCompressionConfig("kv4"), SPEC)
    layer: PackedLayerKV = comp.allocate_cache(num_blocks=6)[0]
    k, v = torch.randn(9, 2, 64), torch.randn(9, 2, 64)
    slots = torch.tensor([20, 21, 22, 23, 4, 5, 6, 7, 8])  # blocks 5 and 1, then block 2
    layer.write(slots, k, v)
    keys, vals = layer.gather(torch.tensor([[5, 1, 2]]))
    assert keys.shape == (1, 12, 2, 64)
    h = hadamard_matrix(64)
    ref_k = dequantize_groups(*quantize_groups(k @ h, 32), 32) @ h
    ref_v = dequantize_groups(*quantize_groups(v, 32), 32)
    torch.testing.assert_close(keys[0, :9], ref_k, rtol=0, atol=1e-5)
    assert torch.equal(vals[0, :9], ref_v)
    assert (keys[0, :9] - k).abs().max() < 0.35  # 4-bit error on N(0,1) data
    # 40 bytes per token/head/layer (K or V) instead of 256: 6.4x
    assert comp.page_size_bytes() * 6.4 == SPEC.page_size_bytes


class _Unrotated:
    """A kv4 layer seen through ``gather`` only: paged attention un-rotates the keys instead of rotating q."""

    def __init__(self, layer: PackedLayerKV):
        self.gather = layer.gather


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_kv4_attention_rotates_queries_not_keys(softcap):
    """Paged attention over kv4 pages reads the keys in the stored (Hadamard) basis and rotates the queries;
    the output equals attention over the un-rotated keys (``gather``) within float32 rounding, for a
    prefill with a prefix, and a decode step of two sequences (with soft-capping: the explicit-score path)."""
    from tierserve.kernels.paged_attention import AttentionMetadata, paged_decode, paged_prefill

    torch.manual_seed(3)
    layer: PackedLayerKV = build_compressor(KVCompressionConfig("kv4"), SPEC).allocate_cache(num_blocks=8)[0]
    layer.write(torch.arange(32), torch.randn(32, 2, 64) * 3, torch.randn(32, 2, 64))  # every page written
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    pre = AttentionMetadata(torch.arange(14), tables[:1], [0, 5], [14], 4)  # 5 queries after 9 cached keys
    dec = AttentionMetadata(torch.arange(2), tables, [0, 1, 2], [14, 3], 4)
    q5, q2 = torch.randn(5, 4, 64) * 2, torch.randn(2, 4, 64) * 2
    for run, q, meta in ((paged_prefill, q5, pre), (paged_decode, q2, dec)):
        got = run(q, layer, meta, 0.125, logit_softcap=softcap)
        ref = run(q, _Unrotated(layer), meta, 0.125, logit_softcap=softcap)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        assert not torch.equal(run(q, _Unrotated(layer), meta, 0.25), ref)  # the comparison can fail


# -- Expected Attention math ----------------------------------------------------------------

def test_closed_form_matches_monte_carlo():
    torch.manual_seed(2)
    d, hq, n = 16, 2, 400_000
    mu = torch.randn(hq, d, dtype=torch.float64) * 0.5
    a = torch.randn(hq, d, d, dtype=torch.float64) * 0.15
    cov = a @ a.transpose(-1, -2)
    keys = torch.randn(12, 1, d, dtype=torch.float64)  # one KV head shared by both query heads
    z = log_expected_scores(mu, cov, keys)  # [Hq, L]
    gen = torch.Generator().manual_seed(3)
    chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(d))
    for h in range(hq):
        q = mu[h] + torch.randn(n, d, generator=gen, dtype=torch.float64) @ chol[h].T
        mc = torch.exp(q @ keys[:, 0].T / math.sqrt(d)).mean(0)
        # Monte-Carlo standard error here is < 0.3% of the mean; allow 1.5% relative
        torch.testing.assert_close(mc.log(), z[h], rtol=0, atol=0.015)


def test_averaged_rotation_equals_explicit_rope_average():
    torch.manual_seed(4)
    d, start, t = 64, 37, 512
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x = torch.randn(5, 3, d, dtype=torch.float64)
    explicit = torch.stack([apply_rope(x, cos[i][None, None], sin[i][None, None]) for i in range(t)]).mean(0)
    torch.testing.assert_close(x @ averaged_rope_matrix(cos, sin).T, explicit, rtol=0, atol=1e-12)


def test_query_statistics_and_scores_shape_and_sinks():
    torch.manual_seed(5)
    q = torch.randn(50, 4, 8)
    rot = torch.eye(8, dtype=torch.float64)
    mu, cov = query_statistics(q, rot)
    torch.testing.assert_close(mu, q.double().mean(0))
    torch.testing.assert_close(cov[1], torch.cov(q[:, 1].double().T, correction=0))
    keys, vals = torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    s = expected_attention_scores(mu, cov, keys, vals, n_sink=4)
    assert s.shape == (2, 20)
    assert (s[:, :4] > s[:, 4:].max()).all()
    # un-normalised: softmax over the 16 non-sink keys, mean over the 2 query heads per KV head
    z = log_expected_scores(mu, cov, keys[4:])
    a = torch.softmax(z, -1).view(2, 2, 16).mean(1)
    torch.testing.assert_close(s[:, 4:], a * vals[4:].double().norm(dim=-1).T)


# -- eviction policy ------------------------------------------------------------------------

def _seq(blocks, kept, step_tokens=1, prompt=8, rid="r"):
    return SeqKV(rid, list(blocks), kept, kept + 100, prompt, step_tokens)


def test_paged_eviction_drops_the_lowest_ratio_block():
    torch.manual_seed(6)
    comp = build_compressor(KVCompressionConfig("paged_eviction", budget=12), SPEC)
    caches = allocate_kv_cache(SPEC, 8)
    for layer in caches:
        layer.k.copy_(torch.randn_like(layer.k))
        layer.v.copy_(torch.randn_like(layer.v))
    comp.bind(None, caches)
    blocks = [3, 6, 1, 7, 2]
    seq = _seq(blocks, kept=20)  # 5 full blocks, newest just filled, over budget 12
    # independent reference: per block, mean over tokens of (mean over layers and heads of |v|/|k|)
    best, best_score = None, None
    for i in range(1, 4):
        vals = []
        for t in range(4):
            per_layer = []
            for layer in caches:
                k, v = layer.k[blocks[i], t], layer.v[blocks[i], t]
                per_layer.append(sum(float(v[h].norm() / k[h].norm()) for h in range(2)) / 2)
            vals.append(sum(per_layer) / len(per_layer))
        score = sum(vals) / 4
        if best_score is None or score < best_score:
            best, best_score = i, score
    assert comp.blocks_to_evict(seq) == [best]
    assert comp.blocks_to_evict(_seq(blocks, kept=19)) == []  # newest block not full yet
    assert comp.blocks_to_evict(_seq(blocks[:3], kept=12)) == []  # at budget
    torch.testing.assert_close(value_key_ratio(torch.ones(1, 2, 4), torch.full((1, 2, 4), 3.0)),
                               torch.tensor([3.0]))


def test_streaming_evicts_oldest_middle_blocks_and_prefill_goes_under_budget():
    comp = build_compressor(KVCompressionConfig("streaming", budget=12), SPEC)
    assert comp.blocks_to_evict(_seq([9, 8, 7, 6, 5], kept=20)) == [1]
    # a 30-token prefill chunk: 8 blocks (last holds 2), over budget by 18 -> 5 blocks, oldest middle ones
    assert comp.blocks_to_evict(_seq(range(8), kept=30, step_tokens=30)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", ["paged_eviction", "streaming", "expected_attention"])
def test_policy_keeps_cache_within_budget_plus_one_block(method):
    """Simulated sequence: prefill 37 tokens, then 60 decode steps; bs 4, budget 13."""
    comp = KV_COMPRESSORS[method](KVCompressionConfig(method, budget=13), SPEC)
    kept, blocks, pos = 0, [], 0
    for step_tokens in [37] + [1] * 60:  # which blocks go does not matter for the size: count only
        kept, pos = kept + step_tokens, pos + step_tokens
        blocks = list(range(-(-kept // 4)))
        n = comp.num_to_evict(SeqKV("r", blocks, kept, pos, 37, step_tokens))
        assert 0 <= n <= len(blocks) - 2
        kept -= 4 * n
        assert kept <= 13 + 4, (method, pos, kept)
    assert pos - kept > 0


def test_ratio_budget():
    comp = build_compressor(KVCompressionConfig("streaming", ratio=0.75), SPEC)
    assert comp.budget(100) == 25 and comp.budget(10) == 8  # at least 2 blocks


# -- bookkeeping ----------------------------------------------------------------------------

def test_kv_cache_manager_evict_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    req = Request("a", list(range(18)), SamplingParams(max_tokens=8))
    assert kv.allocate_slots(req, 18) == [0, 1, 2, 3, 4]
    req.num_computed_tokens = 18
    free_before = kv.num_free_blocks
    kv.evict_blocks(req, [1, 3])
    assert req.block_ids == [0, 2, 4] and kv.num_evicted_tokens("a") == 8
    assert kv.num_free_blocks == free_before + 2 and kv.pool.free_queue()[-2:] == [1, 3]
    # 10 kept tokens in 3 blocks (last holds 2): 2 more tokens fit, the 3rd needs a new block
    assert kv.allocate_slots(req, 2) == []
    req.num_computed_tokens = 20
    assert kv.allocate_slots(req, 1) == [5]
    with pytest.raises(InvalidParameterError, match="indices"):
        kv.evict_blocks(req, [0])
    with pytest.raises(InvalidParameterError, match="indices"):
        kv.evict_blocks(req, [3])  # the current (last) block
    kv.free(req)
    assert kv.num_evicted_tokens("a") == 0


def test_config_validation_names_field_and_limit():
    with pytest.raises(InvalidParameterError, match="kv_compression"):
        KVCompressionConfig("zip")
    with pytest.raises(InvalidParameterError, match="kv_budget"):
        KVCompressionConfig("paged_eviction")
    with pytest.raises(InvalidParameterError, match="kv_budget"):
        KVCompressionConfig("kv4", budget=64)
    with pytest.raises(InvalidParameterError, match="kv_ratio"):
        KVCompressionConfig("streaming", ratio=1.0)
    with pytest.raises(InvalidParameterError, match=r"kv_budget.*2 \* block_size = 32"):
        EngineConfig(cache=CacheConfig(block_size=16), kv_compression=KVCompressionConfig("streaming", budget=20))
    assert not KVCompressionConfig().enabled


def test_cli_flags_build_the_config():
    from tierserve.cli import _build_parser, _engine_kwargs
    from tierserve.engine.llm import build_engine_config

    def config_of(argv):
        args = _build_parser().parse_args(argv)
        return build_engine_config(args.model, **_engine_kwargs(args)).kv_compression

    assert config_of(["generate", "hi", "--kv-compression", "streaming", "--kv-budget", "64"]) == \
        KVCompressionConfig("streaming", budget=64)
    assert config_of(["serve", "--kv-compression", "expected_attention", "--kv-ratio", "0.5"]) == \
        KVCompressionConfig("expected_attention", ratio=0.5)
    assert not config_of(["generate", "hi"]).enabled


# -- composition: a storage format with an eviction method ----------------------------------

def test_composed_config_names_the_conflict():
    kvc = KVCompressionConfig("kv4,expected_attention", ratio=0.5)
    assert kvc.methods == ("kv4", "expected_attention") and kvc.method == "kv4+expected_attention"
    assert kvc.evicts and not KVCompressionConfig("kv4").evicts and not KVCompressionConfig("none").enabled
    assert KVCompressionConfig(("none",)) == KVCompressionConfig()
    with pytest.raises(InvalidParameterError, match="kv_compression.*at most one eviction method.*2"):
        KVCompressionConfig("streaming,paged_eviction", budget=64)
    with pytest.raises(InvalidParameterError, match="kv_compression.*'none' cannot be combined"):
        KVCompressionConfig("none,kv4")
    with pytest.raises(InvalidParameterError, match="kv_budget.*streaming needs exactly one"):
        KVCompressionConfig("kv4,streaming")
    with pytest.raises(InvalidParameterError, match="kv_compression.*'zip'"):
        KVCompressionConfig("kv4,zip")
    from tierserve.config import SpeculativeConfig

    with pytest.raises(InvalidParameterError, match="speculative.*kv4\\+streaming"):
        EngineConfig(kv_compression=KVCompressionConfig("kv4,streaming", budget=64),
                     speculative=SpeculativeConfig("ngram"))


def test_composed_compressor_stores_packed_pages_and_evicts_by_policy():
    comp = build_compressor(KVCompressionConfig("streaming,kv4", budget=12), SPEC)  # order does not matter
    kv4 = build_compressor(KVCompressionConfig("kv4"), SPEC)
    assert comp.name == "kv4+streaming" and comp.evicts
    assert comp.page_size_bytes() == kv4.page_size_bytes()  # 6.4x below the fp32 page
    caches = comp.allocate_cache(num_blocks=6)
    assert all(isinstance(layer, PackedLayerKV) for layer in caches) and len(caches) == SPEC.num_layers
    comp.bind(None, caches)
    assert comp.blocks_to_evict(_seq([9, 8, 7, 6, 5], kept=20)) == [1]  # streaming's choice
    assert comp.blocks_to_evict(_seq([9, 8, 7], kept=12)) == []


def test_scorers_read_packed_pages_dequantized():
    """PagedEviction over kv4 pages picks exactly the block it picks over plain pages holding the
    dequantized values (the reference dequantization written out here: codes -> min + q * scale, keys
    un-rotated by the normalised Sylvester Hadamard matrix)."""
    torch.manual_seed(7)
    comp = build_compressor(KVCompressionConfig("kv4,paged_eviction", budget=12), SPEC)
    packed = comp.allocate_cache(num_blocks=8)
    plain = allocate_kv_cache(SPEC, 8)
    slots = torch.arange(32)
    n = 64
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(n)
    for p, f in zip(packed, plain):
        # keys with per-channel scales so the blocks' value/key ratios differ by more than the 4-bit error
        k = torch.randn(32, 2, 64) * torch.linspace(0.2, 3.0, 32)[:, None, None]
        v = torch.randn(32, 2, 64)
        p.write(slots, k, v)
        codes, scale, zero = quantize_groups(k @ h, 32)
        f.k.view(32, 2, 64).copy_(dequantize_groups(codes, scale, zero, 32) @ h)
        f.v.view(32, 2, 64).copy_(dequantize_groups(*quantize_groups(v, 32), 32))
    blocks = [0, 1, 2, 3, 4]
    from tierserve.cache.compress.base import layer_pages

    for p, f in zip(packed, plain):
        got_k, got_v = layer_pages(p, blocks)
        ref_k, ref_v = layer_pages(f, blocks)
        torch.testing.assert_close(got_k, ref_k, rtol=0, atol=1e-5)  # fp32 rounding of two 64-term products
        assert torch.equal(got_v, ref_v)
    reference = build_compressor(KVCompressionConfig("paged_eviction", budget=12), SPEC)
    reference.bind(None, plain)
    comp.bind(None, packed)
    seq = _seq(blocks, kept=20)
    assert comp.blocks_to_evict(seq) == reference.blocks_to_evict(seq) != []
