"""``tierserve quantize`` for weight formats that need calibration (sigmascale; nvfp4/mxfp4 with gptq=true).

The real command-line entry quantizes a tiny Llama that carries SmolLM2's tokenizer (so the Austen
calibration text tokenizes into its vocabulary); the written folder is loaded with ``load_quantized``.
Reference: the same float model quantized in-process with ``quantize_model`` and activations captured
here directly (``austen_token_windows`` of ``CALIBRATION_NOVELS`` -> ``capture_activations`` over
``forward_hidden``) must give bit-identical logits; activations of other text must not (calibration is used).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from model_harness import PagedRunner, save_tiny_smollm_vocab
from transformers import AutoTokenizer

from tierserve.cli import main
from tierserve.models.quantized_checkpoint import QUANT_CONFIG_FILE, load_quantized
from tierserve.kernels.quant.transform import capture_activations, quantize_model
from tierserve.models.loader import load_model
from tierserve.tools.calibration import (CALIBRATION_NOVELS, HELDOUT_NOVELS, austen_token_windows,
                                       calibration_activations, forward_hidden)

LINEARS = [f"layers.{i}.{p}" for i in range(2)
           for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
TOKENS = [504, 3458, 282, 4649, 314, 2, 77, 1030]
CALIB = ["--calib-windows", "1", "--calib-seq-len", "128"]  # GPTQ needs >= in_features (128) tokens


@pytest.fixture(scope="module")
def tiny_tok_folder(tmp_path_factory, smollm_folder):
    """2-layer Llama (hidden 64) over SmolLM2's 49152-token vocabulary, with SmolLM2's tokenizer files."""
    return save_tiny_smollm_vocab(str(tmp_path_factory.mktemp("tiny_tok")), smollm_folder)


def _acts(model, tok, novels):
    tokens = austen_token_windows(tok, novels, 1, 128)
    return capture_activations(model, lambda m: forward_hidden(m, tokens), LINEARS)


@pytest.mark.parametrize("scheme, options", [
    ("sigmascale", {"keep_ratio": 0.5, "steps": 2}),
    ("nvfp4", {"hadamard": True, "gptq": True}),
])
def test_quantize_cli_calibrated_matches_in_process(scheme, options, tiny_tok_folder, tmp_path):
    out = str(tmp_path / scheme)
    flags = [a for k, v in options.items() for a in ("--option", f"{k}={json.dumps(v)}")]
    assert main(["quantize", "--scheme", scheme, "--model", tiny_tok_folder, "--out", out, *flags, *CALIB]) == 0
    cfg = json.load(open(os.path.join(out, QUANT_CONFIG_FILE)))
    assert cfg["scheme"] == scheme and cfg["options"] == options
    assert cfg["calibration"] == {"novels": list(CALIBRATION_NOVELS), "windows": 1, "seq_len": 128}
    assert sorted(cfg["modules"]) == sorted(LINEARS)
    assert {m["format"] for m in cfg["modules"].values()} == {scheme}
    loaded = load_quantized(out).model
    got = PagedRunner(loaded).step(TOKENS)

    tok = AutoTokenizer.from_pretrained(out)  # the source's tokenizer was copied over
    assert tok.encode("Emma Woodhouse") == AutoTokenizer.from_pretrained(tiny_tok_folder).encode("Emma Woodhouse")
    dense = load_model(tiny_tok_folder).model
    acts = _acts(dense, tok, CALIBRATION_NOVELS)
    assert all(x.shape[0] == 128 for x in acts.values())
    other = load_model(tiny_tok_folder).model
    quantize_model(dense, scheme, calibration=acts, **options)
    assert torch.equal(got, PagedRunner(dense).step(TOKENS))
    quantize_model(other, scheme, calibration=_acts(other, tok, HELDOUT_NOVELS), **options)
    assert not torch.equal(got, PagedRunner(other).step(TOKENS))  # the calibration text matters


def test_calibration_activations_helper(tiny_tok_folder):
    """Batched capture (2 windows per forward over 3 windows) equals one whole-batch capture."""
    model = load_model(tiny_tok_folder).model
    tok = AutoTokenizer.from_pretrained(tiny_tok_folder)
    tokens = austen_token_windows(tok, CALIBRATION_NOVELS, 3, 16)
    ref = capture_activations(model, lambda m: forward_hidden(m, tokens), LINEARS[:3])
    got = calibration_activations(model, tok, LINEARS[:3], 3, 16, batch_size=2)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].shape == (48, ref[name].shape[1])
        assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=0)


def test_quantize_cli_uncalibrated_records_no_calibration(tiny_tok_folder, tmp_path):
    out = str(tmp_path / "q8")
    assert main(["quantize", "--scheme", "q8_0", "--model", tiny_tok_folder, "--out", out]) == 0
    assert "calibration" not in json.load(open(os.path.join(out, QUANT_CONFIG_FILE)))


@pytest.mark.parametrize("flag", ["--calib-windows", "--calib-seq-len"])
def test_quantize_cli_rejects_bad_calibration_sizes(flag, tiny_tok_folder, tmp_path, capsys):
    out = str(tmp_path / "bad")
    args = ["quantize", "--scheme", "sigmascale", "--option", "keep_ratio=0.5", "--model", tiny_tok_folder,
            "--out", out, *CALIB, flag, "0"]
    assert main(args) == 2
    assert f"tierserve: error: {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert not os.path.exists(out)
