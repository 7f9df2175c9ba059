"""Calibration sets too small for the method, and sparsities outside (0, 1): the exact refusals.

Limits (tierserve/tools/calibration_limits.py): GPTQ and Qronos need at least as many calibration tokens as
the widest quantized linear has input features (here the tiny model's down_proj: 128); q4_0 imatrix alone
needs one token; ELSA needs ``batch_size`` windows. Sparsity must lie in (0, 1) (2:4: exactly 0.5). Each
message is compared whole; the pruning refusals are given a model folder that does not exist, so they pass
only when raised before the model is read; a refused quantization writes no output folder. ``quantize_model``
called from Python refuses the same way on the tokens of the activations it is given (a captured mapping,
Qronos's sequential callable), before any linear is swapped. (OffQ's 64-token
limit and its checkpoint loaded on another model: tests/test_offq_checkpoint.py.)
"""

from __future__ import annotations

import os

import pytest
import torch
from model_harness import save_tiny_smollm_vocab

from tierserve.cli import main
from tierserve.errors import InvalidParameterError
from tierserve.tools.prune_weights import prune_weights
from tierserve.tools.quantize import quantize_checkpoint


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_folder):
    """2-layer Llama (hidden 64, intermediate 128) with SmolLM2's tokenizer files."""
    return save_tiny_smollm_vocab(str(tmp_path_factory.mktemp("tiny_refusals")), smollm_folder)


def _rank_message(scheme: str, method: str, windows: int, seq_len: int, use: int) -> str:
    return (f"calib_windows * calib_seq_len: {scheme} with {method}=true needs at least 128 calibration tokens "
            f"(in_features of layers.0.mlp.down_proj: below that its input Hessian has rank < 128), got "
            f"{windows * seq_len} = {windows} x {seq_len}; use calib_windows >= {use}")


def test_gptq_with_fewer_tokens_than_input_features_is_refused(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "gptq")
    args = ["quantize", "--scheme", "nvfp4", "--option", "gptq=true", "--option", "hadamard=true",
            "--model", tiny_folder, "--out", out, "--calib-windows", "1", "--calib-seq-len", "127"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "tierserve: error: " + _rank_message("nvfp4", "gptq", 1, 127, 2)
    assert not os.path.exists(out)


def test_qronos_with_fewer_tokens_than_input_features_is_refused(tiny_folder, tmp_path):
    out = str(tmp_path / "qronos")
    with pytest.raises(InvalidParameterError) as exc:
        quantize_checkpoint(tiny_folder, out, "q4_0", {"qronos": True}, calib_windows=2, calib_seq_len=48)
    assert str(exc.value) == _rank_message("q4_0", "qronos", 2, 48, 3)
    assert exc.value.field == "calib_windows * calib_seq_len"
    assert not os.path.exists(out)


def test_importance_weights_alone_have_no_rank_limit(tiny_folder, tmp_path):
    """q4_0 imatrix uses only the diagonal of X^T X: 16 tokens for 128 features are accepted and used."""
    out = str(tmp_path / "imatrix")
    report = quantize_checkpoint(tiny_folder, out, "q4_0", {"imatrix": True}, calib_windows=1, calib_seq_len=16)
    assert len(report.modules) == 8 and os.path.isdir(out)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.25, 1.5])
def test_sparsity_outside_the_open_unit_interval_is_refused(sparsity, tmp_path):
    with pytest.raises(InvalidParameterError) as exc:
        prune_weights(str(tmp_path / "absent"), str(tmp_path / "out"), "magnitude", sparsity)
    assert str(exc.value) == f"sparsity: must be in (0, 1), got {sparsity}"
    assert not os.path.exists(tmp_path / "out")


def test_two_four_pattern_needs_half_sparsity_and_the_cli_says_so(tmp_path, capsys):
    args = ["prune-weights", "--method", "wanda", "--sparsity", "0.7", "--pattern", "2:4",
            "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "tierserve: error: sparsity: the 2:4 pattern prunes exactly 0.5, got 0.7"
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("windows, elsa, batch", [(3, None, 4), (1, {"batch_size": 2}, 2)])
def test_elsa_with_fewer_windows_than_its_batch_is_refused_before_loading(windows, elsa, batch, tmp_path):
    with pytest.raises(InvalidParameterError) as exc:
        prune_weights(str(tmp_path / "absent"), str(tmp_path / "out"), "elsa", 0.5, calib_windows=windows,
                      elsa=elsa)
    assert str(exc.value) == (f"calib_windows: ELSA needs at least batch_size = {batch} calibration windows, "
                              f"got {windows}")


# -- quantize_model called from Python: the same limits on the activations it is given -------------------

def _python_model(tiny_folder):
    from transformers import AutoTokenizer

    from tierserve.kernels.quant.transform import DEFAULT_SKIP, linear_modules, matches
    from tierserve.models.loader import load_model

    model = load_model(tiny_folder, torch.float32).model
    names = [n for n in linear_modules(model) if not matches(n, DEFAULT_SKIP)]
    return model, names, AutoTokenizer.from_pretrained(tiny_folder)


def _none_swapped(model, names) -> bool:
    modules = dict(model.named_modules())
    return all(type(modules[n]) is torch.nn.Linear for n in names)


@pytest.mark.parametrize("seq_len, refused", [(127, True), (128, False)])
def test_quantize_model_refuses_too_few_captured_tokens(tiny_folder, seq_len, refused):
    """A mapping of captured activations (capture_activations over Austen text): GPTQ below 128 tokens."""
    from tierserve.kernels.quant.transform import quantize_model
    from tierserve.tools.calibration import calibration_activations

    model, names, tokenizer = _python_model(tiny_folder)
    calibration = calibration_activations(model, tokenizer, names, 1, seq_len)
    if not refused:
        assert len(quantize_model(model, "nvfp4", calibration=calibration, gptq=True).modules) == 8
        return
    with pytest.raises(InvalidParameterError) as exc:
        quantize_model(model, "nvfp4", calibration=calibration, gptq=True)
    assert str(exc.value) == ("calibration: nvfp4 with gptq=true needs at least 128 calibration tokens (in_features "
                              "of layers.0.mlp.down_proj: below that its input Hessian has rank < 128), got 127")
    assert _none_swapped(model, names)


def test_quantize_model_refuses_a_short_sequential_calibration_before_any_swap(tiny_folder):
    """Qronos's callable calibration: the first linear's tokens are checked before it is swapped."""
    from tierserve.kernels.quant.transform import quantize_model
    from tierserve.tools.sequential_calibration import SequentialCalibration

    model, names, tokenizer = _python_model(tiny_folder)
    calibration = SequentialCalibration.from_text(model, tokenizer, names, 2, 48)
    with pytest.raises(InvalidParameterError) as exc:
        quantize_model(model, "q4_0", calibration=calibration, qronos=True)
    assert str(exc.value) == ("calibration: q4_0 with qronos=true needs at least 128 calibration tokens (in_features "
                              "of layers.0.mlp.down_proj: below that its input Hessian has rank < 128), got 96")
    assert _none_swapped(model, names)
