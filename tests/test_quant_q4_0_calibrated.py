"""Calibrated Q4_0 (tierserve/kernels/quant/q4_0_calibrated.py): valid ggml blocks, never worse than RTN.

References: gguf-py's Q4_0 dequantizer reads the calibrated blocks (they are plain
Q4_0); the reference RTN blocks (byte-exact with gguf-py, tests/test_quant_ggml.py)
bound the importance-weighted error block by block; GPTQ's output error is compared
with rounding at the same scales, on activations with correlated features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tierserve.kernels.quant  # noqa: F401  (fills the registry)
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.base import get_format
from tierserve.kernels.quant.q4_0 import q4_0_dequantize_blocks
from tierserve.kernels.quant.q4_0_calibrated import column_importance, gptq_blocks, search_blocks
from tierserve.kernels.quant.transform import quantize_model

import gguf  # noqa: E402  (the byte-exact oracle; a dependency of the package, so never skipped)


def _data(seed: int = 0, out: int = 48, cols: int = 128, tokens: int = 400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * 0.05
    w[3, 5] = 0.9  # an outlier in a block of row 3 whose input is nearly silent (below)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix  # correlated features
    x[:, 5] *= 0.01
    return w, x


def _weighted_block_errors(blocks: torch.Tensor, w: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
    deq = q4_0_dequantize_blocks(blocks.reshape(-1, 18)).reshape(w.shape)
    return ((deq - w).pow(2) * imp).reshape(w.shape[0], -1, 32).sum(-1)


@pytest.mark.parametrize("options", [dict(imatrix=True), dict(gptq=True), dict(imatrix=True, gptq=True)])
def test_calibrated_blocks_are_plain_q4_0(options):
    w, x = _data()
    fmt = get_format("q4_0", **options)
    packed = fmt.quantize(w, "w", activations=x)
    blocks = packed.tensors["blocks"]
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (48, 128 // 32 * 18)
    ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(48, 128)
    assert np.array_equal(ref, fmt.dequantize(packed).numpy())
    assert not torch.equal(blocks, get_format("q4_0").quantize(w, "w").tensors["blocks"])


def test_importance_search_never_loses_to_rtn_block_by_block():
    w, x = _data()
    imp = column_importance(x)
    assert torch.allclose(imp, (x.double() ** 2).mean(0).float())
    rtn = get_format("q4_0").quantize(w, "w").tensors["blocks"]
    searched = search_blocks(w, imp)
    e_rtn, e_search = _weighted_block_errors(rtn, w, imp), _weighted_block_errors(searched, w, imp)
    assert bool((e_search <= e_rtn).all())
    # the outlier block (row 3, columns 0..31): RTN spends the whole grid on a silent input; the search does not
    assert e_search[3, 0] < 0.5 * e_rtn[3, 0]
    assert e_search.sum() < 0.9 * e_rtn.sum()
    # blocks the search cannot improve keep RTN's exact bytes (ties go to candidate 0)
    same = (e_search == e_rtn).reshape(-1)
    assert torch.equal(searched.reshape(-1, 18)[same], rtn.reshape(-1, 18)[same])


def test_gptq_lowers_output_error_at_the_same_scales():
    w, x = _data(seed=1)
    rtn = get_format("q4_0").quantize(w, "w").tensors["blocks"]
    g = gptq_blocks(w, x, rtn)
    scales = lambda b: b.reshape(-1, 18)[:, :2]  # noqa: E731
    assert torch.equal(scales(g), scales(rtn))  # GPTQ keeps the block scales
    deq = lambda b: q4_0_dequantize_blocks(b.reshape(-1, 18)).reshape(w.shape)  # noqa: E731
    err_rtn = ((w - deq(rtn)) @ x.T).pow(2).sum()
    err_gptq = ((w - deq(g)) @ x.T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn


def test_quantize_model_passes_calibration_to_q4_0():
    w, x = _data()
    model = nn.Sequential(nn.Linear(128, 48, bias=False))
    model[0].weight.data.copy_(w)
    report = quantize_model(model, "q4_0", skip=(), calibration={"0": x}, imatrix=True)
    assert list(report.modules) == ["0"]
    expected = get_format("q4_0", imatrix=True).quantize(w, "w", activations=x)
    with torch.no_grad():
        y = model(x[:4])
    assert torch.equal(y, nn.functional.linear(x[:4], get_format("q4_0").dequantize(expected)))


def test_calibrated_q4_0_bad_input():
    w, x = _data()
    with pytest.raises(InvalidParameterError, match="calibration"):
        get_format("q4_0", imatrix=True).quantize(w, "layers.0.w")
    with pytest.raises(InvalidParameterError, match=r"layers\.0\.w\.activations.*128"):
        get_format("q4_0", gptq=True).quantize(w, "layers.0.w", activations=x[:, :64])
    with pytest.raises(InvalidParameterError, match="multiple of 32"):
        get_format("q4_0", imatrix=True).quantize(w[:, :100], "layers.0.w", activations=x[:, :100])
    with pytest.raises(InvalidParameterError, match="calibration"):
        quantize_model(nn.Sequential(nn.Linear(128, 48)), "q4_0", skip=(), imatrix=True)


def test_least_squares_refit_only_improves(monkeypatch):
    import tierserve.kernels.quant.q4_0_calibrated as calibrated

    w, x = _data(seed=2)
    imp = column_importance(x)
    refit = _weighted_block_errors(search_blocks(w, imp), w, imp)
    monkeypatch.setattr(calibrated, "REFIT_ROUNDS", 0)
    searched = _weighted_block_errors(search_blocks(w, imp), w, imp)
    assert bool((refit <= searched).all())
    assert refit.sum() < 0.97 * searched.sum()
