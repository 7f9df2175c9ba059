"""The C++ row ops of the eager CPU decoder (kernels/decoder_rows_cpu.py): RMSNorm against the float64 formula and
``F.rms_norm``, ``RMSNorm`` using it in eager CPU mode; RoPE of q and k bit-equal to ``apply_rope_full``; the
argmax equal to ``torch.argmax`` (ties, NaN, infinities, strided rows).

Bound (module doc of decoder_rows_cpu.py): each of the 8 partial sums adds ``D / 8`` rounded squares, then three
pairwise levels and the tail; the square root, the division and the two products add six roundings, so
``|y - y64| <= (D / 16 + 8) * 2^-23 * |y64|`` elementwise, ``y64`` the formula in float64 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tierserve.kernels import decoder_rows_cpu
from tierserve.models.layers import RMSNorm
from tierserve.models.rope import apply_rope_full, rope_tables

pytestmark = pytest.mark.skipif(not decoder_rows_cpu.kernel_available(), reason="no C++ compiler here")


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
    y = decoder_rows_cpu.rms_norm(x, w, 1e-5)
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
    y = decoder_rows_cpu.rms_norm(x, w, 1e-2)
    assert torch.equal(y[0], torch.zeros(64))
    torch.testing.assert_close(y[1].double(), _formula64(x[1], w, 1e-2), rtol=1e-6, atol=0)


def test_rms_norm_reads_strided_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g).t()  # [6, 64], not contiguous
    w = torch.randn(64, generator=g)
    assert torch.equal(decoder_rows_cpu.rms_norm(x, w, 1e-6), decoder_rows_cpu.rms_norm(x.contiguous(), w, 1e-6))


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(RuntimeError, match="w \\[D\\] for x \\[..., D\\]"):
        decoder_rows_cpu.rms_norm(torch.zeros(2, 64), torch.zeros(32), 1e-6)
    with pytest.raises(RuntimeError, match="float32"):
        decoder_rows_cpu.rms_norm(torch.zeros(2, 64, dtype=torch.float64), torch.zeros(64), 1e-6)


@torch.no_grad()  # as the engine runs (inference mode)
def test_rmsnorm_module_uses_kernel_in_eager(monkeypatch):
    g = torch.Generator().manual_seed(7)
    norm = RMSNorm(576, 1e-5, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=g))
    x = torch.randn(4, 576, generator=g)
    assert decoder_rows_cpu.applies(x, norm.weight)
    assert torch.equal(norm(x), decoder_rows_cpu.rms_norm(x, norm.weight, 1e-5))
    calls = []
    monkeypatch.setattr(decoder_rows_cpu, "rms_norm",
                        lambda *a: calls.append(a) or F.rms_norm(a[0], (576,), a[1], a[2]))
    norm(x)
    assert len(calls) == 1
    assert not decoder_rows_cpu.applies(x.double(), norm.weight)  # other dtypes keep the torch path


def test_compiled_rmsnorm_keeps_torch_ops():
    norm = RMSNorm(64, 1e-5, torch.float32)
    x = torch.randn(3, 64)
    compiled = torch.compile(norm, backend="eager", fullgraph=True)  # traced: applies() is False, no extension
    torch.testing.assert_close(compiled(x), F.rms_norm(x, (64,), norm.weight, 1e-5), rtol=0, atol=0)


def _rope_inputs(t: int, hq: int, hkv: int, d: int, seed: int, extra: int):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (hq + hkv) * d + extra, generator=g) * 3
    angles = torch.rand(t, 1, d // 2, generator=g) * 100
    return qkv, rope_tables(angles.cos(), angles.sin())


@pytest.mark.parametrize("t,hq,hkv,d,extra", [
    (1, 9, 3, 64, 3 * 64),     # SmolLM2 at one token, v's columns after q|k
    (5, 9, 3, 64, 3 * 64),     # several tokens
    (3, 4, 1, 256, 256),       # Gemma's 256-wide heads
    (2, 6, 2, 24, 0),          # half-head 12: 8 lanes, then the scalar tail
    (300, 8, 8, 64, 0),        # token-heads over several threads' chunks
])
def test_rope_qk_bit_equal_to_apply_rope_full(t, hq, hkv, d, extra):
    qkv, (cos_full, sin_signed) = _rope_inputs(t, hq, hkv, d, t + d, extra)
    q, k = decoder_rows_cpu.rope_qk(qkv, cos_full, sin_signed, hq, hkv)
    ref = apply_rope_full(qkv[:, :(hq + hkv) * d].reshape(t, hq + hkv, d), cos_full, sin_signed)
    assert q.is_contiguous() and k.is_contiguous()
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d)
    assert torch.equal(q, ref[:, :hq]) and torch.equal(k, ref[:, hq:])


def test_rope_qk_reads_a_row_strided_view():
    qkv, tables = _rope_inputs(4, 2, 1, 32, 1, 0)
    wide = torch.zeros(4, 200)
    wide[:, :96] = qkv
    q, k = decoder_rows_cpu.rope_qk(wide[:, :96], *tables, 2, 1)  # rows 200 floats apart
    q2, k2 = decoder_rows_cpu.rope_qk(qkv, *tables, 2, 1)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def test_rope_qk_rejects_bad_shapes():
    qkv, tables = _rope_inputs(2, 2, 1, 32, 2, 0)
    with pytest.raises(RuntimeError, match="qkv: 128 columns for 3 \\+ 1 heads of 32"):
        decoder_rows_cpu.rope_qk(qkv, *tables, 3, 1)
    with pytest.raises(RuntimeError, match="cos/sin: \\[T, D\\]"):
        decoder_rows_cpu.rope_qk(qkv[:1], *tables, 2, 1)
    with pytest.raises(RuntimeError, match="qkv: \\[T, W\\]"):
        decoder_rows_cpu.rope_qk(qkv[None], *tables, 2, 1)


def test_rope_qk_reads_a_column_major_qkv():
    """Some linear backends return a transposed product (rows not contiguous): same q and k."""
    qkv, tables = _rope_inputs(3, 2, 1, 32, 4, 0)
    q, k = decoder_rows_cpu.rope_qk(qkv.t().contiguous().t(), *tables, 2, 1)
    q2, k2 = decoder_rows_cpu.rope_qk(qkv, *tables, 2, 1)
    assert torch.equal(q, q2) and torch.equal(k, k2)


def test_rmsnorm_keeps_gradients():
    """Where a gradient is asked for, RMSNorm runs the torch form (the kernel has no backward)."""
    norm = RMSNorm(64, 1e-5, torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    assert not decoder_rows_cpu.applies(x, norm.weight)
    norm(x).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        assert decoder_rows_cpu.applies(x, norm.weight)


@pytest.mark.parametrize("m,n", [(1, 49152), (32, 49152), (3, 7), (5, 9), (2, 1)])
def test_argmax_equals_torch(m, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, n, generator=g)
    assert torch.equal(decoder_rows_cpu.argmax(x), x.argmax(dim=-1))


def test_argmax_ties_nan_and_infinities_as_torch():
    x = torch.zeros(6, 21)
    x[0, [3, 11, 19]] = 5.0                      # ties: the first maximum
    x[1, [2, 17]] = float("nan")                  # NaN counts as the maximum: its first index
    x[1, 5] = float("inf")
    x[2] = -float("inf")                          # all -inf: index 0
    x[2, 20] = float("nan")                       # ... unless a NaN, here in the scalar tail
    x[3] = -float("inf")
    x[4] -= 1.0
    x[4, 9], x[4, 10] = 0.0, -0.0                 # +0 and -0 compare equal: the first
    x[5, 20] = 3.0                                # the maximum in the tail past the 8-lane loop
    got = decoder_rows_cpu.argmax(x)
    assert got.tolist() == x.argmax(dim=-1).tolist() == [3, 2, 20, 0, 9, 20]


def test_argmax_reads_strided_rows_and_rejects_bad_input():
    x = torch.randn(4, 64)
    assert torch.equal(decoder_rows_cpu.argmax(x[:, ::2]), x[:, ::2].argmax(dim=-1))
    assert torch.equal(decoder_rows_cpu.argmax(x.t()), x.t().argmax(dim=-1))
    assert torch.equal(decoder_rows_cpu.argmax(x.double()), x.double().argmax(dim=-1))  # torch's, not the kernel
    with pytest.raises(RuntimeError, match=r"float32 \[M, N >= 1\]"):
        decoder_rows_cpu._extension().argmax_rows(torch.randn(3))
