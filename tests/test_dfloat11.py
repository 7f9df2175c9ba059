"""DFloat11: lossless round trips (random, special values, all of SmolLM2), code-length limit, triton decoder, logits."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (CPU tensors)

import glob
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import get_format
from tierserve.kernels.quant.dfloat11 import (WINDOW_BITS, _lookup, decode_block, decode_stream, encode_block,
                                              encode_tensor)
from tierserve.kernels.quant.dfloat11_huffman import build_luts, canonical_codes, code_lengths


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16).reshape(-1)


def _fib(n):
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return f[:n]


def test_random_and_special_values_roundtrip():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 577, generator=g) * 0.03).to(torch.bfloat16)
    w.view(-1)[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e38, 1.0],
                                  dtype=torch.bfloat16)
    s = encode_tensor(w)
    assert torch.equal(_bits(decode_stream(s)), _bits(w))
    assert s.nbytes < w.numel() * 2 * 0.75
    # every bf16 bit pattern once: uniform exponents (no compression) must still round trip
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(_bits(decode_stream(encode_tensor(every))), _bits(every))


@pytest.mark.parametrize("max_len", [32, 12])
def test_code_lengths_limited_on_fibonacci_frequencies(max_len):
    freqs = np.zeros(256, dtype=np.int64)
    freqs[10:50] = _fib(40)  # unconstrained Huffman depth 39
    lengths = code_lengths(freqs, max_len)
    present = lengths[freqs > 0].astype(np.float64)
    assert code_lengths(freqs, 64).max() == 39  # the limit really binds
    assert lengths.max() <= max_len and np.all(lengths[freqs == 0] == 0)
    assert np.sum(2.0 ** -present) == pytest.approx(1.0)  # Kraft: a complete prefix code
    codes = canonical_codes(lengths)
    luts = build_luts(lengths, codes)
    syms = np.flatnonzero(freqs)
    words = np.array([int(codes[s]) << (32 - int(lengths[s])) for s in syms], dtype=np.uint64)
    assert np.array_equal(_lookup(luts, words), syms)  # every codeword decodes through the table hierarchy


def test_block_shares_one_table_and_roundtrips():
    g = torch.Generator().manual_seed(1)
    tensors = {"q": torch.randn(64, 96, generator=g).to(torch.bfloat16),
               "k": (torch.randn(32, 96, generator=g) * 1e-3).to(torch.bfloat16),
               "norm": torch.ones(96, dtype=torch.bfloat16)}
    block = encode_block(tensors)
    out = decode_block(block)
    assert list(out) == list(tensors)
    for name, w in tensors.items():
        assert out[name].shape == w.shape and torch.equal(_bits(out[name]), _bits(w))


def test_rejects_non_bf16():
    with pytest.raises(InvalidParameterError, match=r"layers\.0\.mlp\.up_proj\.weight.*bfloat16"):
        get_format("dfloat11").quantize(torch.randn(4, 8), "layers.0.mlp.up_proj.weight")


@pytest.fixture(scope="module")
def smollm_tensors(smollm_folder):
    with safe_open(glob.glob(os.path.join(smollm_folder, "*.safetensors"))[0], "pt") as f:
        return {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}


def _roundtrip_per_layer(tensors_by_name):
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in tensors_by_name.items():
        key = ".".join(name.split(".")[:3]) if ".layers." in name else name
        groups.setdefault(key, {})[name] = w
    raw = packed = 0
    decode_s = 0.0
    for tensors in groups.values():
        block = encode_block(tensors)
        t0 = time.perf_counter()
        out = decode_block(block)
        decode_s += time.perf_counter() - t0
        for name, w in tensors.items():
            assert torch.equal(_bits(out[name]), _bits(w)), name
        raw += sum(w.numel() * 2 for w in tensors.values())
        packed += block.nbytes
    print(f"\nDFloat11 on SmolLM2 (bf16, one code per layer): {raw / 1e6:.1f} MB -> {packed / 1e6:.1f} MB, "
          f"ratio {packed / raw:.4f}; CPU decode {raw / 1e6 / decode_s:.0f} MB/s")
    return packed / raw


def test_one_smollm_layer_roundtrip(smollm_tensors):
    ratio = _roundtrip_per_layer({k: w for k, w in smollm_tensors.items() if k.startswith("model.layers.0.")})
    assert 0.60 < ratio < 0.72


@pytest.mark.slow
def test_all_smollm_weights_roundtrip_per_layer(smollm_tensors):
    assert 0.60 < _roundtrip_per_layer(smollm_tensors) < 0.72


def test_triton_decoder_equals_cpu_decoder(smollm_tensors):
    from tierserve.kernels.quant.dfloat11_triton import dfloat11_decode

    w = smollm_tensors["model.layers.2.mlp.down_proj.weight"].reshape(-1)[:24_000]  # ~4 blocks of windows
    s = encode_tensor(w)
    assert s.window_offsets.numel() > 2 * 256 and int(s.code_lengths.max()) > 8  # several blocks, 2-level codes
    cpu = decode_stream(s)
    assert torch.equal(_bits(cpu), _bits(w))
    assert torch.equal(_bits(dfloat11_decode(s)), _bits(cpu))
    assert int(s.window_offsets.max()) < WINDOW_BITS


@pytest.mark.slow  # decodes all 120 linears per forward: ~40 s on 2 idle cores
def test_logits_bit_identical_in_bf16(smollm_folder):
    from tierserve.kernels.kv_pages import allocate_kv_cache
    from tierserve.kernels.paged_attention import AttentionMetadata
    from tierserve.kernels.quant.base import QuantizedLinear
    from tierserve.kernels.quant.transform import quantize_model
    from tierserve.models.context import ForwardContext
    from tierserve.models.loader import load_model

    model = load_model(smollm_folder, dtype=torch.bfloat16).model
    ids = [504, 3458, 282, 4649, 314, 2114, 30, 378, 1099, 282, 3412, 1032, 253, 1215, 30]

    def logits():
        spec = model.kv_spec(16)
        kv = allocate_kv_cache(spec, 2)
        meta = AttentionMetadata.build([len(ids)], [len(ids)], [[1]], 16)
        with torch.inference_mode():
            return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), ForwardContext(meta, kv)))

    ref = logits()
    report = quantize_model(model, "dfloat11")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 30 * 4
    assert report.packed_bytes < 0.72 * report.float_bytes
    assert torch.equal(logits(), ref)
