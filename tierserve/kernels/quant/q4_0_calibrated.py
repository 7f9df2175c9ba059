"""Calibrated Q4_0: importance-weighted scale search and GPTQ rounding, both emitting plain Q4_0 blocks.

The blocks are ordinary ggml Q4_0 (fp16 ``d``, codes ``q`` in 0..15, value
``(q - 8) * d``; tierserve.kernels.quant.q4_0), so gguf-py, llama.cpp and every
Q4_0 kernel read them unchanged; only HOW ``d`` and ``q`` are chosen differs from
the reference round-to-nearest (``quantize_row_q4_0_ref``: ``d = max|x| / -8``).
Both need calibration activations ``X [tokens, in]`` of the layer.

**Importance-weighted scale search** (``imatrix=True``; the idea of llama.cpp's
importance matrix): input column ``j`` gets importance ``imp_j = mean_t X[t, j]^2``
(the diagonal of ``X^T X / n``), so a weight's error counts as much as it moves the
layer's output on average. For each block of 32 weights ``x`` of one row, with ``m`` its
signed element of largest magnitude, the candidates are

* the reference RTN block itself (candidate 0), and
* ``d_s = fp16(m * s / -8)`` for the 23 factors ``s = 0.600, 0.625, ..., 1.150``,
  with codes ``q = clamp(trunc(x / d_s + 8.5), 0, 15)`` (the reference rounding, clamped
  at both ends since ``s < 1`` pushes the extremes past the grid);

the block keeps the candidate of least ``sum_j imp_j (x_j - (q_j - 8) d)^2`` evaluated
with the STORED fp16 scale, ties keeping the earliest (so RTN wins unless strictly beaten,
and the weighted error never exceeds RTN's). Then ``REFIT_ROUNDS`` = 3 rounds of refitting
(as llama.cpp's weighted quantizers do): with the block's codes fixed, the weighted
least-squares scale ``d* = sum imp x (q - 8) / sum imp (q - 8)^2``, stored as fp16, the
codes re-rounded at it; the block takes it only when its weighted error is strictly
lower. Measured (benchmarks/quality.py, held-out Austen perplexity, 4 x 256 calibration
tokens): SmolLM2 fp32 63.4, RTN 77.6, searched 71.3, searched + refit 68.8.

**GPTQ** (``gptq=True``; tierserve.kernels.quant.gptq, static order): the block scales
are fixed first (searched when ``imatrix``, else RTN's fp16 ``d``), then the columns are
rounded in order with the reference rounding at those scales and each column's error is
fed forward with the inverse Hessian of ``X``. The result is re-encoded exactly (every
value is ``(q - 8) * d``). SmolLM2: 76.0 (RTN scales), 68.3 (searched scales).
**Qronos** (``qronos=True``): the same with ``reference`` = the float model's inputs X
(``activations`` are then the quantized model's inputs X~, which also drive the
importance): rounding by ``qronos.qronos_quantize``.
"""

from __future__ import annotations

import torch

from tierserve.kernels.quant.ggml_blocks import BLOCK, fp16_bytes, pack_nibbles, unpack_nibbles
from tierserve.kernels.quant.gptq import gptq_quantize, hessian_from_inputs
from tierserve.kernels.quant.q4_0 import q4_0_dequantize_blocks, q4_0_quantize_blocks
from tierserve.kernels.quant.qronos import PairedInputs, qronos_moments, qronos_quantize

#: Scale factors tried after the RTN block (``d = fp16(m * s / -8)``): 0.600 ... 1.150, step 0.025.
SEARCH_FACTORS = tuple(round(0.6 + 0.025 * i, 3) for i in range(23))
#: Least-squares scale refits after the search (module doc).
REFIT_ROUNDS = 3


def column_importance(activations: torch.Tensor) -> torch.Tensor:
    """``imp_j = mean over tokens of X[:, j]^2`` (float32 [in]) for ``X [..., in]``."""
    x = activations.reshape(-1, activations.shape[-1]).double()
    return x.pow(2).mean(0).float()


def _codes(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Reference Q4_0 rounding at scale ``d`` (one per row of ``x``), clamped to 0..15; uint8."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return torch.trunc(x * inv + 8.5).clamp_(0, 15).to(torch.uint8)


def _encode(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[n, 1] float32 scales (already fp16-exact) and [n, 32] codes -> [n, 18] Q4_0 blocks."""
    return torch.cat([fp16_bytes(d), pack_nibbles(q)], dim=-1)


def search_blocks(weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks ``uint8 [out, in / 32 * 18]`` with importance-weighted scales (module doc)."""
    out, cols = weight.shape
    x = weight.detach().float().reshape(-1, BLOCK)
    imp = importance.float().reshape(1, -1, BLOCK).expand(out, -1, -1).reshape(-1, BLOCK)
    m = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))
    candidates = [q4_0_quantize_blocks(x)]
    for s in SEARCH_FACTORS:
        d = (m * s / -8.0).half().float()
        candidates.append(_encode(d, _codes(x, d)))
    errors = torch.stack([_weighted_error(c, x, imp) for c in candidates])
    best = errors.argmin(dim=0)  # first minimum: RTN (index 0) on ties
    blocks = torch.stack(candidates)[best, torch.arange(x.shape[0])]
    blocks = _refit(blocks, x, imp, errors.min(dim=0).values)
    return blocks.reshape(out, cols // BLOCK * blocks.shape[-1])


def _weighted_error(blocks: torch.Tensor, x: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    return ((q4_0_dequantize_blocks(blocks) - x).pow(2) * imp).sum(-1)


def _refit(blocks: torch.Tensor, x: torch.Tensor, imp: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """``REFIT_ROUNDS`` least-squares scale refits, each kept per block only when strictly better."""
    for _ in range(REFIT_ROUNDS):
        q = unpack_nibbles(blocks[:, 2:]).float() - 8.0
        num, den = (imp * x * q).sum(-1, keepdim=True), (imp * q * q).sum(-1, keepdim=True)
        d_old = blocks[:, :2].contiguous().view(torch.float16).float()
        d = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), d_old).half().float()
        candidate = _encode(d, _codes(x, d))
        cand_error = _weighted_error(candidate, x, imp)
        better = cand_error < error
        blocks = torch.where(better[:, None], candidate, blocks)
        error = torch.where(better, cand_error, error)
    return blocks


def gptq_blocks(weight: torch.Tensor, activations: torch.Tensor, blocks: torch.Tensor,
                reference: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ rounding at the fp16 scales of ``blocks`` (Q4_0 bytes of ``weight``); new Q4_0 blocks.

    With ``reference`` (the float model's inputs; ``activations`` are the quantized model's) Qronos rounding.
    """
    out, cols = weight.shape
    per_row = cols // BLOCK
    d = blocks.reshape(-1, blocks.shape[-1] // per_row)[:, :2].contiguous().view(torch.float16).float()
    d = d.reshape(out, per_row)

    def quantize_column(col: torch.Tensor, j: int) -> torch.Tensor:
        dj = d[:, j // BLOCK]
        return (_codes(col, dj).float() - 8.0) * dj

    if reference is None:
        q = gptq_quantize(weight.detach().float(), hessian_from_inputs(activations), quantize_column)
    else:
        hessian, cross = qronos_moments(PairedInputs(reference, activations))
        q = qronos_quantize(weight.detach().float(), hessian, cross, quantize_column)
    dd = d.repeat_interleave(BLOCK, dim=1)
    codes = torch.where(dd == 0, torch.full_like(q, 8.0), torch.round(q / torch.where(dd == 0, 1.0, dd)) + 8.0)
    flat = codes.reshape(-1, BLOCK).to(torch.uint8)
    return _encode(d.reshape(-1, 1), flat).reshape(out, per_row * (2 + BLOCK // 2))


def quantize_calibrated(weight: torch.Tensor, activations: torch.Tensor, imatrix: bool,
                        gptq: bool, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_0 blocks of ``weight [out, in]`` from calibration ``activations [tokens, in]`` (module doc)."""
    if imatrix:
        blocks = search_blocks(weight, column_importance(activations))
    else:
        out, cols = weight.shape
        blocks = q4_0_quantize_blocks(weight.detach().float().reshape(-1, BLOCK)).reshape(out, -1)
    return gptq_blocks(weight, activations, blocks, reference) if gptq else blocks
