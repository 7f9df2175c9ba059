"""PackedLinear (oneDNN prepacked weights) against its torch reference F.linear."""

from __future__ import annotations

import pytest
import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.cpu_linear import (PackedLinear, apply_linear_backend, linear_reference, onednn_available,
                                          onednn_packs, pack_linears)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="oneDNN not available in this torch build")


@pytest.mark.parametrize("rows", [1, 3, 17, 64, 300])
@pytest.mark.parametrize("in_f,out_f", [(64, 96), (576, 960), (1536, 576), (100, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_reference(rows, in_f, out_f, bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_f + out_f)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    x = torch.randn(rows, in_f, generator=g)
    ref = linear_reference(x, w, b)
    got = PackedLinear(w, b)(x)
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * max(scale, 1.0) * (in_f ** 0.5)


def test_packed_keeps_leading_dims_and_bf16():
    w = torch.randn(32, 16)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(PackedLinear(w, None)(x), linear_reference(x, w), atol=1e-5)
    wb, xb = w.bfloat16(), x.bfloat16()
    if onednn_packs(torch.bfloat16):
        got = PackedLinear(wb, None)(xb).float()
        assert (got - linear_reference(xb, wb).float()).abs().max().item() <= 0.05
    else:  # an AVX2-only host: oneDNN refuses bf16, and pack_linears leaves bf16 layers on F.linear
        with pytest.raises(RuntimeError, match="bf16"):
            PackedLinear(wb, None)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32).bfloat16(), torch.nn.Linear(32, 8))
        assert pack_linears(model) == 1
        assert isinstance(model[0], torch.nn.Linear) and isinstance(model[1], PackedLinear)
        assert torch.equal(model[0](xb), linear_reference(xb, model[0].weight, model[0].bias))


def test_pack_transform_swaps_every_linear_once():
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), shared)
    model.alias = shared  # one module under two names: packed once, both names point to it
    x = torch.randn(3, 4)
    ref = model[2](model[1](model[0](x)))
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and model.alias is model[2]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert torch.allclose(model[2](model[1](model[0](x))), ref, atol=1e-5)


def test_unknown_backend_is_named():
    with pytest.raises(InvalidParameterError, match="linear_backend"):
        apply_linear_backend(torch.nn.Linear(2, 2), "cuda-magic")
