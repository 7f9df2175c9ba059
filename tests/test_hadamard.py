"""Block Hadamard rotation: orthogonality, the rotated model's logits, and its effect on MXFP4 error.

The reference for H is the closed form of the Sylvester matrix,
``H[i, j] = (-1)^popcount(i & j) / sqrt(n)``, and for the block rotation an
explicit ``torch.block_diag``. The rotated fp32 model (every nn.Linear
replaced by Hadamard-on-activations + ``W R``) must reproduce the original
logits within 1e-4 on SmolLM2-135M and on a tiny random Llama.
"""

from __future__ import annotations

import math

import pytest
import torch
from model_harness import PagedRunner, build_and_save
from transformers import LlamaConfig

import tierserve.kernels.quant  # noqa: F401  (fills the registry)
from tierserve.kernels.kv_pages import allocate_kv_cache
from tierserve.errors import InvalidParameterError
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.kernels.quant.base import get_format
from tierserve.kernels.quant.hadamard import (RotatedLinear, block_hadamard, hadamard_matrix, rotate_hessian,
                                              rotate_model, rotate_weight)
from tierserve.models.context import ForwardContext
from tierserve.models.loader import load_model

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.")


def _closed_form(n: int) -> torch.Tensor:
    bits = torch.tensor([[bin(a & b).count("1") for b in range(n)] for a in range(n)])
    return ((-1.0) ** bits).double() / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_hadamard_orthogonal_symmetric_and_sylvester(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6, rtol=0)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.double(), _closed_form(n), atol=1e-7, rtol=0)


def test_hadamard_size_must_be_power_of_two():
    with pytest.raises(InvalidParameterError, match="power of two"):
        hadamard_matrix(24)


def test_block_hadamard_is_block_diagonal_product():
    x = torch.randn(5, 96, dtype=torch.float64)
    r = torch.block_diag(*[hadamard_matrix(32, dtype=torch.float64)] * 3)
    assert torch.allclose(block_hadamard(x, 32), x @ r, atol=1e-12)
    w = torch.randn(7, 96, dtype=torch.float64)
    assert torch.allclose(rotate_weight(w, 32), w @ r, atol=1e-12)
    h = torch.randn(96, 96, dtype=torch.float64)
    assert torch.allclose(rotate_hessian(h, 32), r.T @ h @ r, atol=1e-10)
    # y = (x R)(W R)^T
    assert torch.allclose(block_hadamard(x, 32) @ rotate_weight(w, 32).T, x @ w.T, atol=1e-10)


def test_rotation_rejects_ragged_in_features():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 4))
    with pytest.raises(InvalidParameterError) as e:
        rotate_model(model, 32)
    assert e.value.field == "1.weight" and "divisible by 32" in str(e.value)
    assert isinstance(model[0], torch.nn.Linear)  # nothing swapped on error


def _logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    spec = model.kv_spec(block_size)
    nb = spec.blocks_for_tokens(len(ids))
    kv = allocate_kv_cache(spec, nb + 3)
    table = list(range(nb + 2, 2, -1))[:nb]
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [table], block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), ForwardContext(meta, kv))
        return model.compute_logits(hidden)


def test_rotated_smollm2_logits_match(smollm_folder):
    from transformers import AutoTokenizer

    model = load_model(smollm_folder).model
    ids = AutoTokenizer.from_pretrained(smollm_folder).encode(TEXT)
    ref = _logits(model, ids)
    qkv_before = model.layers[0].self_attn.qkv_proj.weight.clone()
    n = rotate_model(model, 32)
    assert n == 4 * len(model.layers)  # fused qkv, o, fused gate_up, down
    assert sum(isinstance(m, RotatedLinear) for m in model.modules()) == n
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(p, RotatedLinear)
                   for p in model.modules() for m in p.children())
    rotated_qkv = model.layers[0].self_attn.qkv_proj.inner.weight
    assert (rotated_qkv - qkv_before).abs().max() > 1e-2  # the weights really changed
    diff = (_logits(model, ids) - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_rotated_tiny_llama_logits_match(tmp_path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, initializer_range=0.1)
    build_and_save(cfg, tmp_path)
    model = load_model(str(tmp_path)).model
    prompt = list(range(3, 23))
    ref = PagedRunner(model).step(prompt)
    assert rotate_model(model, 16) > 0
    assert torch.allclose(PagedRunner(model).step(prompt), ref, atol=1e-4, rtol=0)


def test_rotation_lowers_mxfp4_error_on_planted_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (w.numel() // 200,), generator=g)
    w.view(-1)[idx] *= 40  # 0.5 % outliers, 40x
    errs = {}
    for h in (False, True):
        fmt = get_format("mxfp4", hadamard=h)
        errs[h] = (fmt.dequantize(fmt.quantize(w)) - w).norm().item()
    assert errs[True] < 0.8 * errs[False], errs
