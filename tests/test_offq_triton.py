"""The OffQ W4A4 triton kernel (kernels/quant/offq_triton.py) against OffQFormat.linear, under TRITON_INTERPRET=1."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU tensors)

import pytest  # noqa: E402
import torch  # noqa: E402

from tierserve.errors import InvalidParameterError  # noqa: E402
from tierserve.kernels.quant.offq_format import OffQFormat, quantize_tokens  # noqa: E402
from tierserve.kernels.quant.offq_triton import (offq_linear_triton, offq_triton_supported,  # noqa: E402
                                                 offq_w4a4_matmul)


def _weight_and_inputs(n: int, k: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    x = torch.randn(m, k, generator=g)
    x[:, 3] += 6.0  # an outlier channel with an offset, what OffQ's rotation and offset target
    calib = torch.randn(96, k, generator=g)
    calib[:, 3] += 6.0
    return w, x, calib


@pytest.mark.parametrize("rotation,group,m,n,k", [
    ("none", 0, 1, 40, 96),       # per channel, K step 32, M = 1
    ("hadamard", 64, 3, 48, 128),  # two groups of 64
    ("offq", 32, 17, 40, 64),      # offset folded, groups of 32, two M tiles
    ("offq", 0, 5, 24, 128),       # per channel with offset, bias
])
def test_kernel_matches_reference(rotation, group, m, n, k):
    w, x, calib = _weight_and_inputs(n, k, m, seed=m + n)
    fmt = OffQFormat(rotation=rotation, group=group)
    packed = fmt.quantize(w, "w", activations=calib if rotation == "offq" else None)
    bias = torch.randn(n) if k == 128 and group == 0 else None
    assert offq_triton_supported(packed)
    got = offq_linear_triton(fmt, x, packed, bias)
    ref = fmt.linear(x, packed, bias)
    # same integers; only fp32 summation order and where the scales multiply differ
    q, s = quantize_tokens(fmt.rotate_input(x, packed))
    magnitude = (q.abs() * s) @ fmt.dequantize_rotated(packed).abs().T
    assert ((got - ref).abs() <= 1e-5 * magnitude + 1e-5).all(), float((got - ref).abs().max())
    assert got.shape == (m, n) and got.dtype == x.dtype


def test_kernel_sees_every_code():
    """A weight whose codes span 0..15 in every group and activations spanning -8..7: a wrong nibble order,
    offset or group index changes the output far beyond the bound above."""
    n, k, group = 32, 64, 32
    fmt = OffQFormat(rotation="none", group=group)
    w = (torch.arange(n * k) % 16).float().reshape(n, k)
    w = w[:, torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    packed = fmt.quantize(w, "w")
    x = ((torch.arange(2 * k) % 16) - 8).float().reshape(2, k) * 0.5
    got = offq_linear_triton(fmt, x, packed)
    torch.testing.assert_close(got, fmt.linear(x, packed), rtol=1e-6, atol=1e-4)
    swapped = dict(packed.tensors, qweight=(packed.tensors["qweight"] >> 4) | (packed.tensors["qweight"] << 4))
    wrong = fmt.linear(x, dataclasses.replace(packed, tensors=swapped))  # nibbles in the other order
    assert (wrong - got).abs().max() > 1.0  # the comparison above can fail


def test_int8_dot_path_equals_multiply_adds():
    """The GPU path (``tl.dot`` on int8, int32 accumulation; M >= 16), forced here under the interpreter,
    against the multiply-add path: the same integers, so the same sums."""
    w, x, _ = _weight_and_inputs(40, 128, 20, seed=7)
    fmt = OffQFormat(rotation="none", group=64)
    packed = fmt.quantize(w, "w")
    q, s = quantize_tokens(fmt.rotate_input(x, packed))
    dot = offq_w4a4_matmul(q.to(torch.int8), s, packed, None, torch.float32, use_dot=True)
    fma = offq_w4a4_matmul(q.to(torch.int8), s, packed, None, torch.float32, use_dot=False)
    torch.testing.assert_close(dot, fma, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dot, fmt.linear(x, packed), rtol=1e-5, atol=1e-4)


def test_refuses_what_it_cannot_run():
    w, x, _ = _weight_and_inputs(16, 48, 2, seed=1)
    for fmt in (OffQFormat(rotation="none", group=0), OffQFormat(rotation="none", group=64, act_quant=False)):
        weight = w if fmt.group == 0 else torch.randn(16, 128)
        packed = fmt.quantize(weight, "w")
        assert not offq_triton_supported(packed)
        with pytest.raises(InvalidParameterError, match="offq.*multiples of 32"):
            offq_linear_triton(fmt, torch.randn(2, weight.shape[1]), packed)


def test_module_for_the_cuda_backend():
    """``offq_cuda_module`` (what kernels/gpu_linear.py swaps in on CUDA), run here on CPU tensors: the same
    output as the QuantizedLinear it replaces; a W4A16 weight keeps its QuantizedLinear (None)."""
    from tierserve.kernels.gpu_linear import GPU_KERNEL_PATHS
    from tierserve.kernels.quant.base import QuantizedLinear
    from tierserve.kernels.quant.offq_triton import offq_cuda_module

    w, x, calib = _weight_and_inputs(32, 64, 4, seed=3)
    fmt = OffQFormat(rotation="offq", group=32)
    q = QuantizedLinear(fmt, fmt.quantize(w, "w", activations=calib), torch.randn(32))
    module = GPU_KERNEL_PATHS["offq"](q)
    assert type(module).__name__ == "OffQTritonLinear"
    torch.testing.assert_close(module(x[None]), q(x[None]), rtol=1e-5, atol=1e-4)
    w16 = OffQFormat(rotation="none", group=32, act_quant=False)
    assert offq_cuda_module(QuantizedLinear(w16, w16.quantize(w, "w"), None)) is None
