"""GPTQ (Frantar et al., 2022) with a static quantization order and fixed scales (MR-GPTQ's "static").

Given a weight ``W [out, in]`` and the layer-input Hessian ``H = 2 X^T X / n``
(``n`` calibration rows; the 1/n only rescales H and the relative damping
makes the result independent of it), GPTQ quantizes the columns in order
0..in-1 and feeds each column's rounding error forward onto the columns not
yet quantized, weighted by the inverse Hessian, which minimises
``||(W - Q) X^T||`` far better than rounding each weight alone:

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``;
2. damping: ``H += 0.01 * mean(diag H) * I``;
3. ``U = chol(H^-1)`` (upper Cholesky factor of the inverse);
4. for blocks of 128 columns, for each column j of the block:
   ``q = quant(w_j, j)``, ``e = (w_j - q) / U_jj``,
   ``W[:, j:block_end] -= e U[j, j:block_end]``; after the block,
   ``W[:, block_end:] -= E U[block, block_end:]`` (lazy batch update).

"Static order" means the scales are computed from the original weight before
GPTQ runs and stay fixed (no act-order permutation, no per-group re-fit), so
``quant(w_j, j)`` is any per-column rounding with fixed group scales; the FP4
formats pass E2M1 rounding at their MXFP4/NVFP4 scales (``FP4Format.quantize_calibrated``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GPTQ_BLOCK = 128
GPTQ_DAMP = 0.01

ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` in float64 for inputs ``[..., in]`` (all leading dims are rows)."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2.0 * x.T @ x / max(1, x.shape[0])


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double().clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * h.diagonal().mean()
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, quantizer: ColumnQuantizer,
                  block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """Dequantized GPTQ weight (float32, shape of ``weight``); ``quantizer(column [out], j)`` rounds one column."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp)
    return gptq_rounds(w, u, quantizer, block).float()


def gptq_rounds(w: torch.Tensor, u: torch.Tensor, quantizer: ColumnQuantizer, block: int = GPTQ_BLOCK,
                first: int = 0) -> torch.Tensor:
    """Step 4 on float64 ``w [out, n]`` with ``u [n, n]`` = chol(H^-1) upper; column i is quantizer column first + i.

    ``w`` is updated in place; returns the rounded columns (float64, shape of ``w``).
    """
    cols = w.shape[1]
    q = torch.zeros_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        wb = w[:, start:end].clone()
        err = torch.zeros_like(wb)
        ub = u[start:end, start:end]
        for i in range(end - start):
            col = wb[:, i]
            qc = quantizer(col.float(), first + start + i).double()
            q[:, start + i] = qc
            e = (col - qc) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            err[:, i] = e
        w[:, end:] -= err @ u[start:end, end:]
    return q
