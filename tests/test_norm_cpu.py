"""The C++ RMSNorm of float32 rows (kernels/norm_cpu.py) against the float64 formula and ``F.rms_norm``, and
``RMSNorm`` using it in eager CPU mode.

Bound (module doc of norm_cpu.py): each of the 8 partial sums adds ``D / 8`` rounded squares, then three
pairwise levels and the tail; the square root, the division and the two products add six roundings, so
``|y - y64| <= (D / 16 + 8) * 2^-23 * |y64|`` elementwise, ``y64`` the formula in float64 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierserve.kernels import norm_cpu
from tierserve.models.layers import RMSNorm

pytestmark = pytest.mark.skipif(not norm_cpu.kernel_available(), reason="no C++ compiler here")


def _formula64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape,scale", [
    ((1, 576), 1.0),        # a SmolLM2 decode row
    ((32, 576), 30.0),      # a batch, large values
    ((3, 9, 64), 1e-3),     # per-head q/k norms, small values
    ((2, 1003), 1.0),       # D not a multiple of 8: the scalar tail
    ((4097, 64), 1.0),      # rows over several threads' chunks
    ((5,), 1.0),            # one row, D < 8
])
def test_rms_norm_within_bound_of_float64(shape, scale):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * scale
    w = torch.randn(shape[-1], generator=g)
    y = norm_cpu.rms_norm(x, w, 1e-5)
    ref = _formula64(x, w, 1e-5)
    bound = (shape[-1] / 16 + 8) * 2.0 ** -23 * ref.abs()
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(((y.double() - ref).abs() <= bound).all())
    torch_y = F.rms_norm(x, (shape[-1],), w, 1e-5)
    assert bool(((y.double() - torch_y.double()).abs() <= bound + (torch_y.double() - ref).abs()).all())


def test_rms_norm_eps_dominates_zero_rows():
    x = torch.zeros(2, 64)
    x[1] = 1e-4
    w = torch.full((64,), 2.0)
    y = norm_cpu.rms_norm(x, w, 1e-2)
    assert torch.equal(y[0], torch.zeros(64))
    torch.testing.assert_close(y[1].double(), _formula64(x[1], w, 1e-2), rtol=1e-6, atol=0)


def test_rms_norm_reads_strided_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g).t()  # [6, 64], not contiguous
    w = torch.randn(64, generator=g)
    assert torch.equal(norm_cpu.rms_norm(x, w, 1e-6), norm_cpu.rms_norm(x.contiguous(), w, 1e-6))


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(RuntimeError, match="w \\[D\\] for x \\[..., D\\]"):
        norm_cpu.rms_norm(torch.zeros(2, 64), torch.zeros(32), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        norm_cpu.rms_norm(torch.zeros(2, 64, dtype=torch.float64), torch.zeros(64), 1e-6)


def test_rmsnorm_module_uses_kernel_in_eager(monkeypatch):
    g = torch.Generator().manual_seed(7)
    norm = RMSNorm(576, 1e-5, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
    x = torch.randn(4, 576, generator=g)
    assert norm_cpu.applies(x, norm.weight)
    assert torch.equal(norm(x), norm_cpu.rms_norm(x, norm.weight, 1e-5))
    calls = []
    monkeypatch.setattr(norm_cpu, "rms_norm", lambda *a: calls.append(a) or F.rms_norm(a[0], (576,), a[1], a[2]))
    norm(x)
    assert len(calls) == 1
    assert not norm_cpu.applies(x.double(), norm.weight)  # other dtypes keep the torch path


def test_compiled_rmsnorm_keeps_torch_ops():
    norm = RMSNorm(64, 1e-5, torch.float32)
    x = torch.randn(3, 64)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)  # traced: applies() is False, no extension
    torch.testing.assert_close(compiled(x), F.rms_norm(x, (64,), norm.weight, 1e-5), rtol=0, atol=0)
