"""Sequential calibration for Qronos (tools/sequential_calibration.py) and ``tierserve quantize --option qronos=true``.

On a tiny 2-layer Llama carrying SmolLM2's tokenizer (the Austen text tokenizes into its vocabulary):

* while ``quantize_model`` runs, every ``X~`` handed to the format equals the input of that module in a full,
  uncut forward of the model as it is at that moment (captured independently with ``capture_activations``),
  every ``X`` equals the float model's input; the first linear's ``X~`` is exactly its ``X``, later ones differ;
* calls out of forward order raise InvalidParameterError naming the expected module;
* the command line writes a checkpoint whose logits equal the in-process quantization with the same
  calibration, and differ from GPTQ's (the paired inputs are used).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from model_harness import PagedRunner, save_tiny_smollm_vocab
from transformers import AutoTokenizer

from tierserve.cli import main
from tierserve.errors import InvalidParameterError
from tierserve.kernels.quant.transform import capture_activations, linear_modules, quantize_model
from tierserve.models.loader import load_model
from tierserve.models.quantized_checkpoint import QUANT_CONFIG_FILE, load_quantized
from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows, forward_hidden
from tierserve.tools.sequential_calibration import SequentialCalibration

TOKENS = [504, 3458, 282, 4649, 314, 2, 77, 1030]
OPTIONS = {"hadamard": True, "qronos": True}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_folder):
    return save_tiny_smollm_vocab(str(tmp_path_factory.mktemp("tiny_qronos")), smollm_folder)


def _calibration(model, folder, names):
    tok = AutoTokenizer.from_pretrained(folder)
    return SequentialCalibration.from_text(model, tok, names, 2, 64, batch_size=1)  # 128 = down_proj in_features


def test_paired_inputs_are_the_float_and_the_partially_quantized_models_inputs(tiny_folder):
    model = load_model(tiny_folder).model
    names = [n for n in linear_modules(model) if n.startswith("layers.")]
    float_model = load_model(tiny_folder).model
    windows = austen_token_windows(AutoTokenizer.from_pretrained(tiny_folder), CALIBRATION_NOVELS, 2, 64)
    full = lambda m: forward_hidden(m, windows)  # noqa: E731  (both windows in one uncut forward)
    float_x = capture_activations(float_model, full, names)
    seq = _calibration(model, tiny_folder, names)
    seen = []

    def checked(name):
        pair = seq(name)
        now = capture_activations(model, full, [name])[name]
        torch.testing.assert_close(pair.quant_inputs, now, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pair.float_inputs, float_x[name], rtol=1e-5, atol=1e-6)
        seen.append((name, bool(torch.equal(pair.quant_inputs, pair.float_inputs))))
        return pair

    quantize_model(model, "nvfp4", calibration=checked, **OPTIONS)
    assert [n for n, _ in seen] == names
    assert seen[0][1] and not any(same for _, same in seen[1:])
    with pytest.raises(InvalidParameterError, match="all done"):
        seq(names[0])


def test_out_of_order_call_raises(tiny_folder):
    model = load_model(tiny_folder).model
    names = [n for n in linear_modules(model) if n.startswith("layers.")]
    seq = _calibration(model, tiny_folder, names)
    with pytest.raises(InvalidParameterError, match=names[0].replace(".", r"\.")):
        seq(names[1])


def test_quantize_cli_qronos_matches_in_process(tiny_folder, tmp_path):
    out = str(tmp_path / "q")
    flags = [a for k, v in OPTIONS.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    assert main(["quantize", "--scheme", "nvfp4", "--model", tiny_folder, "--out", out, *flags,
                 "--calib-windows", "2", "--calib-seq-len", "64"]) == 0  # 128 = down_proj's in_features
    cfg = json.load(open(os.path.join(out, QUANT_CONFIG_FILE)))
    assert cfg["options"] == OPTIONS and cfg["calibration"]["windows"] == 2
    got = PagedRunner(load_quantized(out).model).step(TOKENS)

    dense = load_model(tiny_folder).model
    names = [n for n in linear_modules(dense) if n.startswith("layers.")]
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    seq = SequentialCalibration.from_text(dense, tok, names, 2, 64, batch_size=4)  # CALIB_BATCH
    quantize_model(dense, "nvfp4", calibration=seq, **OPTIONS)
    assert torch.equal(got, PagedRunner(dense).step(TOKENS))
    gptq = load_model(tiny_folder).model
    acts = capture_activations(gptq, lambda m: forward_hidden(m, austen_token_windows(tok, CALIBRATION_NOVELS, 2, 64)),
                               names)
    quantize_model(gptq, "nvfp4", calibration=acts, hadamard=True, gptq=True)
    assert not torch.equal(got, PagedRunner(gptq).step(TOKENS))
