"""The least calibration a calibrated weight format takes, checked where ``quantize_model`` receives it.

The reasoning and measurements behind each limit are in tools/calibration_limits.py (which also applies
them to ``tierserve quantize``'s ``calib_windows x calib_seq_len`` before the model is loaded); this is the
same check for a direct ``quantize_model(..., calibration=...)`` call, on the token count the activations
carry, with the same message:

* a format rounding against the inputs' Hessian (``gptq=True`` or ``qronos=True``): at least as many
  tokens as the widest quantized linear has input features (below that the Hessian is singular);
* a format declaring ``min_calibration_tokens`` (``offq``: 64): at least that many.

Tokens of a calibration (``calibration_tokens``): a mapping name ->
activations ``[tokens, in]`` (or ``PairedInputs``): the most rows any quantized linear got (every dense
linear sees all tokens, an expert of an MoE block fewer); a plain callable: the rows of the first linear's
activations (``quantize_model`` asks for them first, before any swap; the first linear in forward order
is a dense one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tierserve.errors import InvalidParameterError

TOKENS_FIELD = "calib_windows * calib_seq_len"


def rank_method(fmt) -> str | None:
    """``"qronos"`` / ``"gptq"`` when the weight format rounds against the inputs' Hessian, else None."""
    for method in ("qronos", "gptq"):
        if getattr(fmt, method, False):
            return method
    return None


def rows(x) -> int:
    """Tokens in one linear's calibration activations: a tensor ``[tokens, in]`` or ``PairedInputs``."""
    return int(getattr(x, "float_inputs", x).shape[0])


def calibration_tokens(calibration, names, first) -> int:
    """Tokens of ``calibration`` for the linears ``names`` (module doc); ``first``: the activations it gave
    for the first of them."""
    if isinstance(calibration, Mapping):
        return max(rows(calibration[n]) for n in names if n in calibration)
    return rows(first)


def check_calibration_tokens(scheme: str, fmt, widths: dict[str, int], tokens: int,
                             shape: tuple[int, int] | None = None, field: str = TOKENS_FIELD) -> None:
    """Refuse ``tokens`` calibration tokens for ``fmt`` quantizing linears of in_features ``widths``.

    ``shape`` (calib_windows, calib_seq_len), when known, is named in the message with the windows needed.
    """
    least = int(getattr(fmt, "min_calibration_tokens", 1))
    if tokens < least:
        raise InvalidParameterError(field, f"scheme {scheme!r} needs at least {least} calibration tokens, "
                                           f"got {tokens}")
    method = rank_method(fmt)
    if method is None or not widths:
        return
    name = max(widths, key=lambda n: widths[n])
    need = widths[name]
    if tokens >= need:
        return
    got = f"{tokens}" if shape is None else (f"{tokens} = {shape[0]} x {shape[1]}; use calib_windows >= "
                                             f"{math.ceil(need / shape[1])}")
    raise InvalidParameterError(field, f"{scheme} with {method}=true needs at least {need} calibration tokens "
                                       f"(in_features of {name}: below that its input Hessian has rank < {need}), "
                                       f"got {got}")
