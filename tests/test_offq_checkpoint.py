"""``tierserve quantize --scheme offq`` -> checkpoint -> engine, on a tiny random Llama with SmolLM2's tokenizer.

* the written folder records scheme, calibration, ``kv_compression: kv4`` and the source model's shape;
* loaded through the engine (``LLMEngine``, quantization "auto", ``--kv-compression kv4``) its logits equal,
  bit for bit, those of the same float model quantized in memory with activations captured here, both on
  the torch reference path and on the int4 CPU path (the engine's "auto" linear backend);
* greedy generation through the engine with 4-bit KV pages equals this file's own paged decode of the
  in-memory model over a kv4 page cache (token-identical);
* bad input: too few calibration tokens, a checkpoint whose config.json is another model, a rotation made
  for another width.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from model_harness import PagedRunner, save_tiny_smollm_vocab
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tierserve.cli import main
from tierserve.errors import ModelLoadError
from tierserve.kernels.cpu_linear import apply_linear_backend
from tierserve.kernels.quant.offq_cpu import OffQInt4Linear
from tierserve.kernels.quant.transform import capture_activations, quantize_model
from tierserve.models.loader import load_model
from tierserve.models.quantized_checkpoint import QUANT_CONFIG_FILE, WEIGHTS_FILE, load_quantized
from tierserve.tools.calibration import CALIBRATION_NOVELS, austen_token_windows, forward_hidden

LINEARS = [f"layers.{i}.{p}" for i in range(2)
           for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
TOKENS = [504, 3458, 282, 4649, 314, 2, 77, 1030, 9, 41]
CALIB = ["--calib-windows", "1", "--calib-seq-len", "64"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_folder):
    """2-layer Llama (hidden 128, head_dim 64 as kv4 needs) over SmolLM2's vocabulary and tokenizer."""
    return save_tiny_smollm_vocab(str(tmp_path_factory.mktemp("tiny_offq")), smollm_folder, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def offq_folder(tiny_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("offq_ckpt") / "q")
    assert main(["quantize", "--scheme", "offq", "--model", tiny_folder, "--out", out, *CALIB]) == 0
    return out


def _in_memory(tiny_folder):
    """The float model quantized in this process from activations captured here."""
    model = load_model(tiny_folder).model
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    tokens = austen_token_windows(tok, CALIBRATION_NOVELS, 1, 64)
    quantize_model(model, "offq", calibration=capture_activations(model, lambda m: forward_hidden(m, tokens), LINEARS))
    return model


def _engine(folder, backend, **kw):
    from tierserve.engine.llm import build_engine_config
    from tierserve.engine.llm_engine import LLMEngine

    kw = kw or {"kv_compression": "kv4"}
    return LLMEngine(build_engine_config(folder, quantization="auto", linear_backend=backend,
                                         num_blocks=32, block_size=16, max_num_seqs=1, **kw))


def test_engine_serves_the_checkpoints_kv_format_unless_told(offq_folder):
    from tierserve.cache.compress.kv4 import KV4Compressor

    engine = _engine(offq_folder, "torch", enable_prefix_caching=True)  # kv_compression left unset
    assert engine.config.kv_compression.methods == ("kv4",) and isinstance(engine.kv_compressor, KV4Compressor)
    other = _engine(offq_folder, "torch", kv_compression="xquant", kv_latent_bits=0)
    assert other.config.kv_compression.methods == ("xquant",)


def test_config_records_scheme_kv_and_source(offq_folder):
    cfg = json.load(open(os.path.join(offq_folder, QUANT_CONFIG_FILE)))
    assert cfg["scheme"] == "offq" and cfg["kv_compression"] == "kv4"
    assert cfg["calibration"] == {"novels": list(CALIBRATION_NOVELS), "windows": 1, "seq_len": 64}
    assert sorted(cfg["modules"]) == sorted(LINEARS)
    assert {m["meta"]["rotation"] for m in cfg["modules"].values()} == {"offq"}
    assert cfg["source"]["hidden_size"] == 128 and cfg["source"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_engine_logits_equal_in_memory(backend, offq_folder, tiny_folder):
    engine = _engine(offq_folder, backend)
    fast = [m for m in engine.model.modules() if isinstance(m, OffQInt4Linear)]
    assert len(fast) == (len(LINEARS) if backend == "auto" else 0)
    want_model = _in_memory(tiny_folder)
    apply_linear_backend(want_model, backend)
    assert torch.equal(PagedRunner(engine.model).step(TOKENS), PagedRunner(want_model).step(TOKENS))


def test_engine_generates_with_kv4_like_in_memory(offq_folder, tiny_folder):
    from tierserve.cache.compress.kv4 import KV4Compressor
    from tierserve.config import KVCompressionConfig
    from tierserve.sampling_params import SamplingParams

    engine = _engine(offq_folder, "torch")
    engine.add_request(TOKENS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id="r")
    got = []
    while engine.has_unfinished():
        for out in engine.step():
            got += out.new_token_ids
    model = _in_memory(tiny_folder)
    runner = PagedRunner(model, block_size=16, num_blocks=8)
    runner.kv = KV4Compressor(KVCompressionConfig("kv4"), model.kv_spec(16)).allocate_cache(8)
    assert got == runner.greedy(TOKENS, 6)


def test_too_few_calibration_tokens(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "few")
    args = ["quantize", "--scheme", "offq", "--model", tiny_folder, "--out", out, "--calib-windows", "1",
            "--calib-seq-len", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("tierserve: error: calib_windows * calib_seq_len: scheme 'offq' needs at least 64 "
                           "calibration tokens, got 32")
    assert not os.path.exists(out)


def test_checkpoint_of_another_model_is_refused(offq_folder, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(offq_folder, other)
    path = os.path.join(other, "config.json")
    cfg = json.load(open(path))
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ModelLoadError) as exc:
        load_quantized(other)
    assert str(exc.value) == (f"{other}: config.json has num_hidden_layers = 3 but this offq checkpoint was made "
                              f"from a model with num_hidden_layers = 2; its quantized weights do not belong to "
                              f"this model")


def test_rotation_of_another_width_is_refused(offq_folder, tmp_path):
    other = str(tmp_path / "swapped")
    shutil.copytree(offq_folder, other)
    tensors = load_file(os.path.join(other, WEIGHTS_FILE))
    tensors["layers.1.mlp.down_proj.v"] = tensors["layers.1.mlp.gate_up_proj.v"].clone()  # 128 wide; down_proj: 256
    save_file(tensors, os.path.join(other, WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"'layers.1.mlp.down_proj.v' is torch.float64 \[128\] but format offq "
                                             r"stores torch.float64 \[256\]"):
        load_quantized(other)
