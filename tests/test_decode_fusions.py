"""The fused decode-step forms equal the explicit ones they replace (bit for bit: same float32 ops).

- ``RMSNorm`` in float32 is one ``F.rms_norm`` call where the C++ row kernel does not serve it (compiled
  graphs; kernels/decoder_rows_cpu.py has its own tests): equal to the explicit formula
  ``w * (x * rsqrt(mean(x^2) + eps))`` for several shapes and scales.
- ``Attention`` without q/k norm or clipping rotates q and k in one RoPE call over their adjacent heads:
  q, k, v equal the general path's (split, two RoPE calls) at 1 and several tokens, on a real Llama layer, also
  through the step's widened cos/sin tables (``apply_rope_full``: mul, roll, mul, add; a fused multiply-add such as
  ``addcmul`` would round once less and fails here), which are built once per step.
- A two-term ``Int4CpuLinear`` (Q8_0) sums its bf16 terms in float32 as before: equal to the float32 sum of
  the two kernel outputs computed here.
"""

from __future__ import annotations

import pytest
import torch
from model_harness import build_and_save
from transformers import LlamaConfig

from tierserve.kernels import decoder_rows_cpu
from tierserve.kernels.quant.base import get_format
from tierserve.kernels.quant.int4_cpu import int4_from_q8_0
from tierserve.models.context import ForwardContext
from tierserve.models.layers import RMSNorm
from tierserve.models.loader import load_model
from tierserve.models.rope import RopeSpec, RotaryEmbedding, apply_rope, apply_rope_full


@pytest.mark.parametrize("shape,scale", [((1, 576), 1.0), ((7, 64), 30.0), ((2, 3, 96), 1e-3)])
def test_rmsnorm_fused_equals_formula(shape, scale, monkeypatch):
    monkeypatch.setattr(decoder_rows_cpu, "applies", lambda x, w: False)  # the path a compiled graph takes
    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-5, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = torch.randn(*shape, generator=g) * scale
    explicit = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(norm(x), explicit)


@pytest.fixture(scope="module")
def llama_layer(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_fusions")
    build_and_save(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64), path)
    return load_model(str(path)).model


@pytest.mark.parametrize("tokens", [1, 5])
def test_merged_rope_equals_two_calls(llama_layer, tokens):
    model = llama_layer
    attn = model.layers[0].self_attn
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g)
    positions = torch.arange(3, 3 + tokens)
    model.rope.ensure(64)
    cos, sin = model.rope.lookup(positions, torch.float32)
    ctx = ForwardContext(None, [])
    with torch.no_grad():
        merged, general = attn._qkv_rope_merged(x, cos, sin), attn._qkv_rope(x, cos, sin)
        full = attn._qkv_rope_merged(x, cos, sin, ctx.rope_tables(cos, sin))
    for a, b, c in zip(merged, general, full):
        assert a.shape == b.shape == c.shape and torch.equal(a, b) and torch.equal(c, b)
    assert merged[0].is_contiguous() and merged[1].is_contiguous()
    assert full[0].is_contiguous() and full[1].is_contiguous()


@pytest.mark.parametrize("tokens", [1, 4, 33])
def test_rope_full_tables_bit_equal(tokens):
    """``apply_rope_full`` on the step's widened tables equals ``apply_rope`` bit for bit (yarn scaling, large
    positions, 12 heads), and the step builds the tables once (every layer gets the same tensors)."""
    rope = RotaryEmbedding(RopeSpec.from_hf({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                                            100000.0, 2048), 64, 2048)
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 4000, (tokens,), generator=g)
    rope.ensure(4000)
    cos, sin = rope.lookup(positions, torch.float32)
    x = torch.randn(tokens, 12, 64, generator=g) * 4
    ctx = ForwardContext(None, [])
    tables = ctx.rope_tables(cos, sin)
    assert ctx.rope_tables(cos, sin) is tables and ctx.rope_tables(cos.clone(), sin) is not tables
    assert torch.equal(apply_rope_full(x, *tables), apply_rope(x, cos, sin))


def test_two_term_int4_sum_in_float32():
    g = torch.Generator().manual_seed(0)
    fmt = get_format("q8_0")
    mod = int4_from_q8_0(fmt.quantize(torch.randn(48, 64, generator=g) * 0.1))  # the path without the int-dot kernel
    assert mod.n_terms == 2
    x = torch.randn(3, 64, generator=g)
    xb = x.to(torch.bfloat16)
    parts = [torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, mod.group, sz) for p, sz in mod.terms()]
    with torch.no_grad():
        assert torch.equal(mod(x), parts[0].float() + parts[1].float())
