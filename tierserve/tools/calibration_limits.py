"""How much calibration text each calibrated method needs, and why; the refusals of ``quantize`` / ``prune-weights``.

``n`` = calib_windows x calib_seq_len tokens; each token is one row of every linear's input ``X [n, in]``.

* GPTQ (``gptq=true`` on mxfp4 / nvfp4 / q4_0) and Qronos (``qronos=true``): ``n >= in`` for the widest
  quantized linear (SmolLM2-135M: 1536, its ``down_proj``; Gemma-3-270m: 2048). Both round each weight
  column against ``H = 2 X^T X / n`` (Qronos: ``H~`` of the quantized model's inputs ``X~``), whose rank is
  at most ``n``. With ``n < in`` H is singular: the 1 % damping alone sets its inverse along the
  ``in - n`` directions no calibration token spans, and the error feedback pushes each column's rounding
  error along exactly those directions, where the calibration objective is blind to it. Qronos also fits
  the inherited error ``X - X~`` with ``in`` coefficients per output row from the ``n`` rows: below ``n = in``
  the plain fit (the paper's) interpolates the calibration tokens exactly, and the ridge that replaces it
  (``kernels/quant/qronos.py``, ``lam_c = (in / n) x mean diag H~``) exceeds the mean eigenvalue of ``H~``,
  so the ridge, not the data, decides the correction. ``n = in`` is therefore the least at which both
  are determined by the calibration text; it is the limit and not a larger multiple because it is the
  rank condition, independent of the activations' spectrum. Measured on full-rank correlated inputs
  (in = 64, inherited error as in tests/test_qronos.py ``_drifted``; objective ``||X W^T - X~ Q^T||`` on
  20,000 fresh rows, mean of 3 seeds):

  ========  =====  =====  =====  =====  =====  =====
  n / in    0.25   0.5    1      1.5    2      3
  GPTQ      1736   1744   1575   1519   1495   1484
  Qronos    1723   1714   1570   1505   1461   1425
  ========  =====  =====  =====  =====  =====  =====

  so both are worse than plain rounding (1536.6) on unseen text up to ``n = in`` and win only above it: the
  quality benchmarks calibrate on 16 x 256 = 4096 tokens (2.7 x SmolLM2's 1536, 2 x Gemma's 2048).
* q4_0 ``imatrix`` alone: ``n >= 1``. It weights columns by ``mean_t x_tj^2`` (the diagonal of ``X^T X / n``),
  defined from one token; no inverse, so no rank condition.
* OffQ (``offq``): ``n >= 64`` (``offq_format.MIN_CALIBRATION_TOKENS``: the standard error of the shared
  offset; the format's ``min_calibration_tokens``, checked before the model is loaded).
* Wanda (``prune-weights --method wanda``): ``n >= 1``: the score ``|W_ij| ||X_j||`` needs the column norms
  only (again no inverse).
* ELSA / ELSA-L: ``calib_windows >= batch_size`` (default 4): each ADMM step takes ``batch_size`` whole
  windows of the calibration text in order; fewer give no batch at all (``tools/elsa.py`` guards the
  same for direct callers; here it is refused before the model is loaded).
* XQuant takes no calibration: its latent basis is an SVD of the K/V projection weights.

Each refusal is an ``InvalidParameterError`` naming the field, the value given and the limit. The checks
themselves are ``kernels/quant/calibration_rows.py``, shared with ``quantize_model`` (a direct Python call
with too small a ``calibration=`` gets the same message, on field ``calibration``, before any swap).
"""

from __future__ import annotations

from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.calibration_rows import check_calibration_tokens


def check_rank_calibration(scheme: str, fmt, widths: dict[str, int], windows: int, seq_len: int) -> None:
    """Refuse ``windows x seq_len`` tokens when a GPTQ / Qronos format would quantize a wider linear.

    ``widths``: in_features of every linear that will be quantized.
    """
    check_calibration_tokens(scheme, fmt, widths, windows * seq_len, (windows, seq_len))


def check_elsa_windows(windows: int, batch_size: int) -> None:
    """ELSA's ADMM steps take ``batch_size`` windows at a time: fewer windows than that give no step."""
    if windows < batch_size:
        raise InvalidParameterError("calib_windows", f"ELSA needs at least batch_size = {batch_size} calibration "
                                                     f"windows, got {windows}")
