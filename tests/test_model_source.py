"""What ``model`` / ``quantization`` resolve to (engine/model_source.py), the embedded default above all.

- The default on the CPU is SmolLM2's GGUF kept packed (load mode "auto"), with a tokenizer folder written
  once from the GGUF that encodes and decodes exactly as transformers' own GGUF tokenizer (the reference);
  ``quantization="none"`` (and any non-CPU device) gives the fp32 conversion, unpacked; another scheme name
  quantizes that folder. A named model keeps its path; "none" and None load it unpacked.
- An engine built with no model runs every SmolLM2 projection on the int4 CPU kernel and produces the same
  greedy tokens as the GGUF loaded with ``quantization="auto"`` (the same weights and kernels, so equal), and
  ``quantization="none"`` runs the oneDNN-packed fp32 weights.
"""

from __future__ import annotations

import os

import pytest

from tierserve.engine.model_source import DEFAULT_MODEL_NAME, resolve_model
from tierserve.errors import ModelLoadError

TEXTS = ["It is a truth universally acknowledged, that a single man", "Émile's café: 42 ñ\n\tdone"]


def test_default_on_cpu_is_the_packed_gguf(smollm_gguf, hf_smollm):
    from transformers import AutoTokenizer

    for quantization in (None, "auto"):
        src = resolve_model(None, quantization, "cpu")
        assert (src.weights, src.name, src.quantization) == (smollm_gguf, DEFAULT_MODEL_NAME, "auto")
    tok = AutoTokenizer.from_pretrained(src.tokenizer)
    _, ref = hf_smollm
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)


def test_default_unpacked_on_request_or_off_cpu(smollm_folder):
    for quantization, device_type, mode in (("none", "cpu", None), (None, "cuda", None), ("none", "cuda", None),
                                            ("q4_0", "cpu", "q4_0")):
        src = resolve_model(None, quantization, device_type)
        assert (src.weights, src.name, src.quantization, src.tokenizer) == (smollm_folder, DEFAULT_MODEL_NAME,
                                                                            mode, None)


def test_named_models_keep_their_path(smollm_folder, smollm_gguf, tmp_path):
    assert resolve_model(smollm_folder, "none").quantization is None
    assert resolve_model(smollm_folder).quantization is None
    src = resolve_model(smollm_gguf, "auto")
    assert (src.weights, src.quantization, src.is_gguf) == (smollm_gguf, "auto", True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(os.path.join(tmp_path, "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_default_engine_runs_packed(smollm_gguf):
    from tierserve import LLM, SamplingParams
    from tierserve.kernels.cpu_linear import PackedLinear
    from tierserve.kernels.quant.int4_cpu import Int4CpuLinear
    from tierserve.kernels.quant.q8_dot_cpu import available
    from tierserve.kernels.quant.q8_dot_linear import Q8DotLinear

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    default = LLM(num_blocks=64, max_num_seqs=2)
    layer = default.engine.model.layers[0]
    packed_cls = Q8DotLinear if available() else Int4CpuLinear  # the integer-dot kernel where it builds
    assert all(isinstance(m, packed_cls) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                      layer.mlp.gate_up_proj, layer.mlp.down_proj))
    got = [o.token_ids for o in default.generate(prompts, params)]
    del default
    ref = LLM(smollm_gguf, quantization="auto", num_blocks=64, max_num_seqs=2)
    assert got == [o.token_ids for o in ref.generate(prompts, params)]
    del ref
    fp32 = LLM(quantization="none", num_blocks=64, max_num_seqs=2)
    assert isinstance(fp32.engine.model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert fp32.engine.model.layers[0].mlp.gate_up_proj.packed.dtype.is_floating_point
