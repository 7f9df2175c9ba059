"""Qronos (Zhang, Colbert, Saab et al., arXiv 2505.11695): sequential rounding that corrects inherited error.

GPTQ (``gptq.py``) rounds a linear's columns against the inputs the FLOAT model
feeds it. Once the earlier layers are quantized, the layer actually sees other
inputs ``X~`` (same tokens, row for row) instead of the float ``X``. Qronos
rounds each output row ``w`` of ``W [out, in]`` to codes ``q`` on the format's
grid so as to reproduce the ORIGINAL layer output from the quantized model's
inputs, minimising (per row)

    ||X w - X~ q||^2 + lam ||w' - q||^2,

where ``w'`` is ``w`` with dead input columns (``X~[:, j] = 0``) zeroed and
``lam`` = ``GPTQ_DAMP`` x mean diag of ``H~`` is GPTQ's relative damping,
written as a ridge penalty so it enters both moments (it is exactly Qronos on
the augmented inputs ``[X; sqrt(lam) I]`` and ``[X~; sqrt(lam) I]``). The
moments, scaled ``2 / n`` like ``hessian_from_inputs``: ``H = 2 X~^T X~ / n``
(dead diagonal entries set to 1) plus ``lam I``, and ``C = 2 X^T X~ / n``, so the
right-hand side of the normal equations is ``B = W C + lam W'`` (row r is
``X~^T X w_r + lam w'_r``).

Algorithm (the paper's Algorithm 1 in the efficient form it derives, as in the
reference brevitas.graph.qronos), with ``U = chol(H^-1)`` upper:

1. column 0, against the original future columns (the step that corrects the
   inherited error): ``q_0 = quant((B[:, 0] - W'[:, 1:] H[1:, 0]) / H[0, 0])``;
2. the not yet quantized columns by least squares given ``q_0`` (absorbing the
   inherited and the local rounding error): ``V = (B[:, 1:] - q_0 H[0, 1:])
   H[1:, 1:]^-1``, with ``H[1:, 1:]^-1 = U[1:, 1:]^T U[1:, 1:]`` (Schur complement);
3. columns 1.. by GPTQ's rounds (``gptq.gptq_rounds``) from ``V`` with
   ``U[1:, 1:]``: since ``V`` solves the least-squares problem, the objective left
   is ``||X~_{1:} (V - Q)||^2`` + const, whose sequential minimiser (quantize
   column t, least-squares update of the rest) is exactly GPTQ's update.

With ``X~ = X``: ``B = W' H``, step 1 gives ``quant(w'_0)`` and step 2 GPTQ's
update, so the codes equal GPTQ's. Static order and fixed scales as in
``gptq.py``: ``quantizer(column, j)`` rounds column j at the format's scales.

Inherited-error ridge (``qronos_moments``): ``B`` uses ``C' = H~ + (C - H~) (H~ + lam_c I)^-1 H~``
instead of ``C``, i.e. the float inputs replaced by ``X^ = X~ + X~ beta``, ``beta`` the ridge regression
of the inherited error ``X - X~`` on ``X~`` with ``lam_c = INHERITED_RIDGE x (in / n) x mean diag H~``
(1.0 x features per calibration token). The plain fit (``raw_moments``, the paper's form; it is
exactly ``lam_c = 0``) has ``in`` coefficients per output row estimated from ``n`` rows: with few rows
per feature it fits the calibration tokens' noise (benchmarks/qronos_study.py, SmolLM2 nvfp4 +had,
16 x 256 tokens: mean relative output error of the linears 0.076 on calibration text against GPTQ's
0.144, but 0.209 on held-out text against 0.190; down_proj has in = 1536 for 4096 rows), which is
why Qronos lost KL to GPTQ while the paper (128 x 2048 tokens) does not. ``X~ = X`` still gives
``C' = H~`` (GPTQ's codes) and ``n >> in`` gives ``C' -> C``. ``tierserve quantize`` refuses fewer
calibration tokens than the widest linear's ``in`` (``n < in``: ``H~`` has rank < in and ``lam_c`` exceeds
the mean eigenvalue of ``H~``, so the ridge, not the data, sets the correction; tools/calibration_limits.py).

``PairedInputs`` carries ``X`` and ``X~`` of one linear from the sequential
calibration (``tools/sequential_calibration.py``) to a format built with
``qronos=True`` (its ``quantize(weight, name, activations=PairedInputs)``).
Measured (benchmarks/quality.py --qronos and benchmarks/qronos_study.py): see benchmarks/quality.py.
Tests (tests/test_qronos.py): X~ = X gives GPTQ's codes; with X~ != X the
objective is below GPTQ's; on held-out rows from 3 x in calibration rows it is below GPTQ's
(the plain fit is not); equality of the plain fit with a direct step-by-step least-squares
transcription of the paper's equations on tiny matrices; formats and the
sequential calibration end to end on a random model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.gptq import GPTQ_BLOCK, GPTQ_DAMP, ColumnQuantizer, gptq_rounds

INHERITED_RIDGE = 1.0  # lam_c = INHERITED_RIDGE x (in_features / calibration rows) x mean diag H~


@dataclass(frozen=True)
class PairedInputs:
    """One linear's calibration inputs: ``float_inputs`` X (float model) and ``quant_inputs`` X~, ``[tokens, in]``."""

    float_inputs: torch.Tensor
    quant_inputs: torch.Tensor

    def __post_init__(self):
        if tuple(self.float_inputs.shape) != tuple(self.quant_inputs.shape):
            raise InvalidParameterError("calibration", f"float inputs {list(self.float_inputs.shape)} and quantized "
                                                       f"inputs {list(self.quant_inputs.shape)} must match")


def paired_inputs(activations, tensor_name: str, in_features: int) -> PairedInputs:
    """``activations`` checked as the PairedInputs of a weight with ``in_features`` columns."""
    if not isinstance(activations, PairedInputs):
        raise InvalidParameterError("calibration", f"qronos needs the float and the quantized model's inputs of "
                                                   f"{tensor_name!r} (PairedInputs from the sequential calibration, "
                                                   f"tierserve quantize), got {type(activations).__name__}")
    if activations.float_inputs.shape[-1] != in_features:
        raise InvalidParameterError(f"{tensor_name}.activations", f"must have {in_features} features, "
                                                                  f"got {activations.float_inputs.shape[-1]}")
    return activations


def qronos_moments(inputs: PairedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H~, C')`` in float64: ``H~ = 2 X~^T X~ / n`` and the cross moment with the inherited error ridge-fitted.

    ``C = 2 X^T X~ / n`` would fit the inherited error ``X - X~`` by plain least squares on the ``n``
    calibration rows; ``C' = H~ + (C - H~) (H~ + lam_c I)^-1 H~`` is ``2 X^^T X~ / n`` for
    ``X^ = X~ + X~ beta``, ``beta`` the ridge regression of ``X - X~`` on ``X~`` with
    ``lam_c = (in / n) mean diag H~`` (module doc; ``lam_c -> 0`` gives ``C`` back, ``X~ = X`` gives ``H~``).
    All leading dims of the inputs are rows.
    """
    x = inputs.float_inputs.reshape(-1, inputs.float_inputs.shape[-1]).double()
    xq = inputs.quant_inputs.reshape(-1, inputs.quant_inputs.shape[-1]).double()
    n, cols = max(1, x.shape[0]), x.shape[1]
    h, c = 2.0 * xq.T @ xq / n, 2.0 * x.T @ xq / n
    lam = INHERITED_RIDGE * cols / n * float(h.diagonal().mean())
    if lam <= 0.0:  # no live input: nothing to fit
        return h, c
    ridge = h + lam * torch.eye(cols, dtype=h.dtype, device=h.device)
    return h, h + (c - h) @ torch.linalg.solve(ridge, h)


def raw_moments(inputs: PairedInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2 X~^T X~ / n, 2 X^T X~ / n)`` in float64: the paper's moments, the inherited error fit unregularised."""
    x = inputs.float_inputs.reshape(-1, inputs.float_inputs.shape[-1]).double()
    xq = inputs.quant_inputs.reshape(-1, inputs.quant_inputs.shape[-1]).double()
    n = max(1, x.shape[0])
    return 2.0 * xq.T @ xq / n, 2.0 * x.T @ xq / n


def qronos_quantize(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, quantizer: ColumnQuantizer,
                    block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """Dequantized Qronos weight (float32, shape of ``weight``) from ``H~`` and ``C`` (``qronos_moments``)."""
    cols = weight.shape[1]
    for field, m in (("hessian", hessian), ("cross", cross)):
        if tuple(m.shape) != (cols, cols):
            raise InvalidParameterError(field, f"must be [{cols}, {cols}], got {list(m.shape)}")
    w = weight.detach().double()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w_live = w.clone()
    w_live[:, dead] = 0.0
    lam = damp * h.diagonal().mean()
    diag = torch.arange(cols, device=h.device)
    h[diag, diag] += lam
    b = w @ cross.detach().double() + lam * w_live
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    q[:, 0] = quantizer(((b[:, 0] - w_live[:, 1:] @ h[1:, 0]) / h[0, 0]).float(), 0).double()
    if cols > 1:
        u_rest = u[1:, 1:]
        v = ((b[:, 1:] - q[:, :1] @ h[:1, 1:]) @ u_rest.T) @ u_rest
        q[:, 1:] = gptq_rounds(v, u_rest, quantizer, block, first=1)
    return q.float()
