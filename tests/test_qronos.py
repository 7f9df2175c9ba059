"""Qronos (tierserve.kernels.quant.qronos): against GPTQ, the paper's equations, and through the formats.

* X~ = X: exactly GPTQ's codes (also with a dead input column and blocks that split the columns);
* X~ != X: the objective ||X W^T - X~ Q^T|| is below GPTQ's, both GPTQ on X~ and GPTQ on X;
* held out: fitted on 3 x in_features rows and judged on fresh rows, below GPTQ on X~ (the paper's plain
  least-squares fit of the inherited error, ``raw_moments``, is not: it overfits the calibration rows);
* a direct transcription of the paper's Algorithm 1 (on ``raw_moments``) (each step an explicit least-squares solve,
  ``torch.linalg.lstsq``; damping as the augmented rows ``sqrt(lam) I``) gives the same codes;
* nvfp4 (+hadamard) and q4_0 with ``qronos=True`` and X~ = X write the same bytes as ``gptq=True``;
  with X~ != X they lower the layer's output error against the float layer;
* bad input: qronos and gptq together, plain activations for qronos, mismatched pairs.
"""

from __future__ import annotations

import math

import pytest
import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import get_format
from tierserve.kernels.quant.gptq import GPTQ_DAMP, gptq_quantize, hessian_from_inputs
from tierserve.kernels.quant.qronos import PairedInputs, qronos_moments, qronos_quantize, raw_moments


def _grid_quantizer(w: torch.Tensor, bits: int = 3):
    """Per-row fixed scale, symmetric uniform grid: round(col / s) clamped to the signed range, times s."""
    top = 2 ** (bits - 1)
    s = w.abs().amax(1) / (top - 0.5)

    def quant(col: torch.Tensor, j: int) -> torch.Tensor:
        return (col / s).round().clamp(-top, top - 1) * s

    return quant, s


def _codes(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.round(q.double() / s.double()[:, None]).long()


def _problem(seed: int, out: int = 12, cols: int = 20, n: int = 160, mismatch: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.5  # correlated inputs
    xq = x + mismatch * x.std() * torch.randn(n, cols, generator=g)
    return w, x, xq


def test_equal_inputs_give_gptq_codes():
    for seed in range(3):
        w, x, _ = _problem(seed)
        x[:, 5] = 0.0  # a dead input column
        quant, s = _grid_quantizer(w)
        h, c = qronos_moments(PairedInputs(x, x))
        for block in (7, 128):
            ours = qronos_quantize(w, h, c, quant, block=block)
            ref = gptq_quantize(w, hessian_from_inputs(x), quant, block=block)
            assert torch.equal(_codes(ours, s), _codes(ref, s))
            assert torch.equal(ours, ref)


def _objective(w, x, xq, q) -> float:
    return float((x.double() @ w.double().T - xq.double() @ q.double().T).norm())


def test_lower_objective_than_gptq_when_inputs_differ():
    for seed in range(4):
        w, x, xq = _problem(seed, mismatch=0.3)
        quant, _ = _grid_quantizer(w)
        h, c = qronos_moments(PairedInputs(x, xq))
        ours = _objective(w, x, xq, qronos_quantize(w, h, c, quant))
        gptq_on_xq = _objective(w, x, xq, gptq_quantize(w, hessian_from_inputs(xq), quant))
        gptq_on_x = _objective(w, x, xq, gptq_quantize(w, hessian_from_inputs(x), quant))
        assert ours < 0.95 * gptq_on_xq, (seed, ours, gptq_on_xq)
        assert ours < 0.95 * gptq_on_x, (seed, ours, gptq_on_x)


def _paper_algorithm(w, x, xq, quant, damp: float) -> torch.Tensor:
    """Algorithm 1 of the paper, step by step with explicit least squares (rows of W at once).

    Scaled as the implementation (sqrt(2 / n)) with the damping as augmented rows sqrt(lam) I.
    t = 0..N-1: q_t = Q(<X~_t, X w - sum_{j<t} q_j X~_j - sum_{j>t} w^(t-1)_j X~_j> / ||X~_t||^2),
    then w^(t)_{>t} = argmin_v ||X w - sum_{j<=t} q_j X~_j - X~_{>t} v||.
    """
    n, cols = x.shape
    a, aq = math.sqrt(2.0 / n) * x.double(), math.sqrt(2.0 / n) * xq.double()
    lam = damp * float((aq * aq).sum(0).mean())
    eye = math.sqrt(lam) * torch.eye(cols, dtype=torch.float64)
    a, aq = torch.cat([a, eye]), torch.cat([aq, eye])
    target = a @ w.double().T  # [rows, out]
    cur = w.double().T.clone()  # [cols, out]: w^(t-1)
    q = torch.zeros_like(cur)
    for t in range(cols):
        resid = target - aq[:, :t] @ q[:t] - aq[:, t + 1:] @ cur[t + 1:]
        arg = aq[:, t] @ resid / (aq[:, t] @ aq[:, t])
        q[t] = quant(arg.float(), t).double()
        if t + 1 < cols:
            cur[t + 1:] = torch.linalg.lstsq(aq[:, t + 1:], target - aq[:, :t + 1] @ q[:t + 1]).solution
    return q.T.float()


@pytest.mark.parametrize("damp", [0.0, GPTQ_DAMP])
def test_matches_the_papers_equations_by_direct_least_squares(damp):
    for seed in range(3):
        w, x, xq = _problem(seed, out=5, cols=7, n=40, mismatch=0.4)
        quant, s = _grid_quantizer(w)
        h, c = raw_moments(PairedInputs(x, xq))  # the paper's moments (no ridge on the inherited error)
        ours = qronos_quantize(w, h, c, quant, block=3, damp=damp)
        ref = _paper_algorithm(w, x, xq, quant, damp)
        assert torch.equal(_codes(ours, s), _codes(ref, s))


def _drifted(n: int, seed: int, cols: int = 64):
    """Inputs as a quantized model passes them on: X~ = X A + noise (A near I), correlated X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    drift = torch.eye(cols) + 0.1 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    w = torch.randn(48, cols, generator=g) * 0.5

    def sample(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(rows, cols, generator=g) @ mix
        return x, x @ drift + 0.3 * torch.randn(rows, cols, generator=g)

    return w, sample(n), sample(20000)


def test_held_out_objective_below_gptq_from_few_calibration_rows():
    """Fitted on n = 3 x in_features rows, judged on 20000 fresh rows of the same distribution: the plain
    least-squares fit of the inherited error (raw_moments, the paper's form) overfits the calibration rows and
    loses to GPTQ on X~ there (measured 0.277 against 0.272); the ridge on the inherited error (qronos_moments)
    wins (0.261). With 64 x in_features rows the ridge costs < 1% against the plain fit (measured 0.65%)."""
    quant = lambda col, j: torch.round(col / 0.25) * 0.25  # noqa: E731
    for seed in range(3):
        w, (x, xq), (xh, xqh) = _drifted(192, seed)
        ours = _objective(w, xh, xqh, qronos_quantize(w, *qronos_moments(PairedInputs(x, xq)), quant))
        gptq = _objective(w, xh, xqh, gptq_quantize(w, hessian_from_inputs(xq), quant))
        assert ours < 0.98 * gptq, (seed, ours, gptq)
    w, (x, xq), (xh, xqh) = _drifted(4096, 0)
    ours = _objective(w, xh, xqh, qronos_quantize(w, *qronos_moments(PairedInputs(x, xq)), quant))
    plain = _objective(w, xh, xqh, qronos_quantize(w, *raw_moments(PairedInputs(x, xq)), quant))
    assert ours < 1.01 * plain, (ours, plain)


def _real_shaped(seed: int, cols: int = 64, out: int = 24, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    x = torch.randn(n, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    return w, x, x + 0.3 * torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("scheme,options", [("nvfp4", {"hadamard": True}), ("mxfp4", {}),
                                            ("q4_0", {"imatrix": True}), ("q4_0", {})])
def test_formats_equal_gptq_on_equal_inputs_and_beat_it_otherwise(scheme, options):
    w, x, xq = _real_shaped(0)
    qronos_fmt, gptq_fmt = get_format(scheme, qronos=True, **options), get_format(scheme, gptq=True, **options)
    assert qronos_fmt.paired_calibration and qronos_fmt.needs_calibration
    same = qronos_fmt.quantize(w, "w", activations=PairedInputs(x, x))
    ref = gptq_fmt.quantize(w, "w", activations=x)
    assert all(torch.equal(same.tensors[k], ref.tensors[k]) for k in ref.tensors)
    ours = qronos_fmt.dequantize(qronos_fmt.quantize(w, "w", activations=PairedInputs(x, xq)))
    theirs = gptq_fmt.dequantize(gptq_fmt.quantize(w, "w", activations=xq))
    assert _objective(w, x, xq, ours) < 0.95 * _objective(w, x, xq, theirs)


def test_bad_input():
    w, x, xq = _real_shaped(1)
    for scheme in ("nvfp4", "mxfp4", "q4_0"):
        with pytest.raises(InvalidParameterError, match="options"):
            get_format(scheme, gptq=True, qronos=True)
        with pytest.raises(InvalidParameterError, match="PairedInputs"):
            get_format(scheme, qronos=True).quantize(w, "layers.0.w", activations=x)
        with pytest.raises(InvalidParameterError, match="features"):
            get_format(scheme, qronos=True).quantize(w, "layers.0.w", activations=PairedInputs(x[:, :32], x[:, :32]))
    with pytest.raises(InvalidParameterError, match="calibration"):
        PairedInputs(x, xq[:10])
    with pytest.raises(InvalidParameterError, match="cross"):
        qronos_quantize(w, torch.eye(64), torch.eye(32), lambda col, j: col)
