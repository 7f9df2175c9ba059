"""``tierserve quantize``: write a quantized checkpoint (models/quantized_checkpoint.py) from a float one.

``quantize_checkpoint(model, out, scheme, options, calib_windows=16,
calib_seq_len=256)`` is ``tierserve quantize``: load a folder or .gguf in
float32, ``quantize_model``, ``save_quantized`` (with the source's tokenizer
files, or the GGUF's tokenizer written out). When the format built from
(scheme, options) declares ``needs_calibration`` (sigmascale; mxfp4/nvfp4 with
``gptq=True``), the inputs of every linear that will be quantized (those not
matching ``skip``) are captured first over ``calib_windows`` x
``calib_seq_len`` tokens of ``CALIBRATION_NOVELS`` (Austen; tokenized with the
checkpoint's own tokenizer, the folder's or the one written out of the GGUF),
prefilled ``CALIB_BATCH`` = 4 windows per forward
(``tools.calibration.calibration_activations``), and passed as ``calibration=``.
The quantization config then also records ``"calibration": {"novels",
"windows", "seq_len"}`` (ignored by the loader). Formats without the flag get
no calibration pass. A format that also declares ``paired_calibration``
(``qronos=true``) gets a ``tools.sequential_calibration.SequentialCalibration``
over the same windows instead: the float inputs X captured first, and each
linear's inputs X~ re-captured from the model with every earlier linear already
quantized, just before that linear is quantized.

A format may set ``min_calibration_tokens`` (``offq``: 64, the rows its
per-site offset is averaged over): fewer than ``calib_windows x
calib_seq_len`` tokens raise InvalidParameterError naming the count and the
limit before the model is loaded. GPTQ and Qronos (``gptq=true`` / ``qronos=true``) need at least as
many tokens as the widest quantized linear has input features (its Hessian's rank; the reasoning and the
measurements are in ``tools/calibration_limits.py``): fewer raise InvalidParameterError naming the count,
the limit and the linear, after the model is loaded and before anything is written. The default 16 x 256
= 4096 tokens covers SmolLM2-135M (1536) and Gemma-3-270m (2048) and is what the quality benchmarks use.
``offq`` (OffQ W4A4, ``kernels/quant/offq_format.py``) is calibrated like the others (rotation and
offset per linear from its inputs); its checkpoint records ``"kv_compression": "kv4"`` (save_quantized),
the KV format it is meant to be served with: ``--kv-compression kv4``.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from tierserve.errors import InvalidParameterError, ModelLoadError
from tierserve.kernels.quant.base import WEIGHT_FORMATS, get_format
from tierserve.kernels.quant.transform import DEFAULT_SKIP, QuantizeReport, linear_modules, matches, quantize_model
from tierserve.models.loader import load_model
from tierserve.models.quantized_checkpoint import save_quantized
from tierserve.kernels.quant.calibration_rows import check_calibration_tokens
from tierserve.tools.calibration_limits import check_rank_calibration

CALIB_BATCH = 4  # calibration windows per forward


def _calibration_kind(scheme: str, options: dict, tokens: int):
    """(the format built from the options, needs calibration, needs the paired sequential calibration).

    ``tokens`` (calibration windows x length) is checked against the format's ``min_calibration_tokens``.
    """
    try:
        fmt = get_format(scheme, **options)
    except TypeError as exc:  # as quantize_model reports an option the format's constructor does not take
        raise InvalidParameterError("options", f"scheme {scheme!r} rejects options {options}: {exc}") from exc
    needs = bool(getattr(fmt, "needs_calibration", False))
    if needs:  # the format's min_calibration_tokens; the rank limit needs the model's widths (after loading)
        check_calibration_tokens(scheme, fmt, {}, tokens)
    return fmt, needs, bool(getattr(fmt, "paired_calibration", False))


def _tokenizer(folder: str):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"calibration needs the checkpoint's tokenizer but {folder!r} has none "
                             f"loadable: {exc}") from exc


def quantize_checkpoint(model_path: str, out_dir: str, scheme: str, options: dict,
                        skip: tuple[str, ...] = DEFAULT_SKIP, calib_windows: int = 16,
                        calib_seq_len: int = 256) -> QuantizeReport:
    """Quantize a float checkpoint (folder or .gguf) into a quantized folder; returns the transform's report.

    Calibrated formats get activations of ``calib_windows`` x ``calib_seq_len`` Austen tokens (module docstring).
    """
    if scheme not in WEIGHT_FORMATS:
        raise InvalidParameterError("scheme", f"unknown scheme {scheme!r}; known: {sorted(WEIGHT_FORMATS)}")
    for field, value in (("calib_windows", calib_windows), ("calib_seq_len", calib_seq_len)):
        if value < 1:
            raise InvalidParameterError(field, f"must be >= 1, got {value}")
    fmt, needs_calibration, paired = _calibration_kind(scheme, options, calib_windows * calib_seq_len)
    loaded = load_model(model_path, torch.float32)
    names = [n for n in linear_modules(loaded.model) if not matches(n, skip)]
    if needs_calibration:  # before anything is written
        modules = dict(loaded.model.named_modules())
        check_rank_calibration(scheme, fmt, {n: int(modules[n].weight.shape[1]) for n in names}, calib_windows,
                               calib_seq_len)
    is_folder = os.path.isdir(model_path)
    if not is_folder:  # a .gguf: its tokenizer goes into the output folder (and serves calibration)
        from tierserve.models.gguf import write_hf_tokenizer

        os.makedirs(out_dir, exist_ok=True)
        write_hf_tokenizer(model_path, out_dir)
    calibration, record = None, None
    if needs_calibration:
        from tierserve.tools.calibration import CALIBRATION_NOVELS, calibration_activations

        tokenizer = _tokenizer(model_path if is_folder else out_dir)
        if paired:
            from tierserve.tools.sequential_calibration import SequentialCalibration

            calibration = SequentialCalibration.from_text(loaded.model, tokenizer, names, calib_windows,
                                                          calib_seq_len, CALIB_BATCH, CALIBRATION_NOVELS)
        else:
            calibration = calibration_activations(loaded.model, tokenizer, names, calib_windows, calib_seq_len,
                                                  CALIB_BATCH, CALIBRATION_NOVELS)
        record = {"novels": list(CALIBRATION_NOVELS), "windows": calib_windows, "seq_len": calib_seq_len}
    report = quantize_model(loaded.model, scheme, skip=skip, calibration=calibration, **options)
    del calibration  # free the activations before writing
    save_quantized(loaded.model, loaded.hf_config, out_dir, scheme, options,
                   tokenizer_from=model_path if is_folder else None, calibration=record)
    return report
