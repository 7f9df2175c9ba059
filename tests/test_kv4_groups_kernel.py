"""The fused kv4 page gather (kernels/quant/kv4_groups.py, kv4_groups_cpu.cpp) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tierserve.kernels.quant.kv4_groups import (
    gather_dequantized,
    gather_reference,
    kernel_available,
    quantize_groups,
)

pytestmark = pytest.mark.skipif(not kernel_available(), reason="no C++ compiler for the CPU kernel")


@pytest.mark.parametrize("head_dim,group", [(64, 32), (64, 16), (256, 64), (128, 128), (64, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_gather_equals_the_reference_bit_for_bit(head_dim, group, threads):
    torch.manual_seed(head_dim + group)
    x = torch.randn(23, 16, 3, head_dim) * torch.logspace(-3, 2, head_dim)  # wide ranges per group
    x[4] = 0.5                                                                # constant groups: scale 1
    codes, scale, zero = quantize_groups(x, group)
    pages = torch.tensor([[7, 0, 22, 4], [7, 7, 1, 13]])                      # repeats, any order, 2-d tables
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gather_dequantized(codes, scale, zero, pages, group)
    finally:
        torch.set_num_threads(previous)
    ref = gather_reference(codes, scale, zero, pages.reshape(-1), group)
    assert got.dtype == torch.float32 and got.shape == (8 * 16, 3, head_dim)
    assert torch.equal(got, ref)


def test_bad_inputs_name_the_limit():
    codes, scale, zero = quantize_groups(torch.randn(4, 2, 1, 64), 32)
    with pytest.raises(RuntimeError, match="page id 4 out of range"):
        gather_dequantized(codes, scale, zero, torch.tensor([0, 4]), 32)
    with pytest.raises(RuntimeError, match="group must be even and divide head_dim"):
        gather_dequantized(codes, scale, zero, torch.tensor([0]), 48)
    with pytest.raises(RuntimeError, match=r"scale and zero must be \[NB, BS, H, D/g\]"):
        gather_dequantized(codes, scale, zero, torch.tensor([0]), 16)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        gather_dequantized(codes.transpose(0, 1), scale, zero, torch.tensor([0]), 32)
