"""ggml block formats (Q4_0, Q4_1, Q8_0): byte-exact against gguf-py, triton vs torch, GGUF packed loading,
quantized checkpoints, the quantize_model transform and its error paths.

References: gguf-py's ``gguf.quants.quantize/dequantize`` (bytes), the float GGUF load path (weights and
logits of the packed model), a direct re-quantization (checkpoint tensors).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles any kernel of this module

import importlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from model_harness import PagedRunner, build_and_save  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from tierserve.errors import InvalidParameterError, ModelLoadError  # noqa: E402
from tierserve.kernels.quant import base  # noqa: E402
from tierserve.kernels.quant.base import QuantizedLinear, get_format  # noqa: E402
from tierserve.models.quantized_checkpoint import (QUANT_CONFIG_FILE, WEIGHTS_FILE, load_for_engine,  # noqa: E402
                                                   load_quantized)
from tierserve.tools.quantize import quantize_checkpoint  # noqa: E402
from tierserve.kernels.quant.embedding import QuantizedEmbedding  # noqa: E402
from tierserve.kernels.quant.transform import capture_activations, model_nbytes, quantize_model  # noqa: E402
from tierserve.models.gguf import read_gguf  # noqa: E402
from tierserve.models.gguf.hf_mapping import _unpermute_rows  # noqa: E402
from tierserve.models.gguf.packed import PackedSource, packed_rows  # noqa: E402
from tierserve.models.loader import load_model  # noqa: E402

FORMATS = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
PROMPTS = [[1, 504, 3458, 282, 4649, 314, 216], [1, 9707, 28, 655, 1399, 314, 3632, 30, 378]]


def _special_blocks() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ties = torch.arange(32, dtype=torch.float32) * 0.5 - 8.0          # max |x| = -8 -> d = 1: x + 8.5 ties
    pos_max = torch.arange(32, dtype=torch.float32) * 0.5 - 7.5       # max |x| = +8 -> d = -1, code 16 clipped
    halves = (torch.arange(32, dtype=torch.float32) - 16) * 127 / 254  # Q8_0: x * id hits .5 exactly
    rows = [torch.zeros(32), ties, pos_max, halves, -pos_max,
            torch.randn(32, generator=g) * 1e-6,                       # fp16-subnormal scale
            torch.randn(32, generator=g) / 3,                          # scale not representable in fp16
            torch.tensor([3.0, -3.0] * 16),                            # equal |max| of both signs: first wins
            torch.full((32,), 0.7)]                                    # constant block (Q4_1: d = 0)
    return torch.stack(rows)


def _real_weight(folder: str) -> torch.Tensor:
    return load_file(os.path.join(folder, "model.safetensors"))["model.layers.3.mlp.down_proj.weight"][:64]


@pytest.mark.parametrize("name", FORMATS)
def test_bytes_match_gguf_py(name, smollm_folder):
    fmt, qtype = get_format(name), FORMATS[name]
    special = _special_blocks()
    cases = [special.reshape(3, 96), torch.randn(48, 160, generator=torch.Generator().manual_seed(0)) * 2,
             _real_weight(smollm_folder)]
    for w in cases:
        packed = fmt.quantize(w)
        ref = gguf_quantize(w.numpy(), qtype)
        assert packed.tensors["blocks"].dtype == torch.uint8
        assert np.array_equal(packed.tensors["blocks"].numpy(), ref)
        assert np.array_equal(fmt.dequantize(packed).numpy(), gguf_dequantize(ref, qtype))
    if name == "q4_0":  # a zero block stores d = -0.0 and codes 8
        assert fmt.quantize(torch.zeros(1, 32)).tensors["blocks"][0].tolist() == [0x00, 0x80] + [0x88] * 16


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("m", [1, 7, 64])
def test_triton_matches_torch_reference(name, m):
    fmt = get_format(name)
    kernel = getattr(importlib.import_module(f"tierserve.kernels.quant.{name}_triton"), f"{name}_linear_triton")
    g = torch.Generator().manual_seed(m)
    for n, k, with_bias in [(32, 32, False), (96, 160, True), (64, 224, False)]:
        packed = fmt.quantize(torch.randn(n, k, generator=g))
        x = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g) if with_bias else None
        y = kernel(x, packed.tensors["blocks"], n, bias)
        ref = torch.nn.functional.linear(x.double(), fmt.dequantize(packed).double(),
                                         None if bias is None else bias.double()).float()
        assert y.shape == (m, n)
        torch.testing.assert_close(y, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(fmt.linear(x, packed, bias), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


def test_shape_rule_names_the_tensor():
    with pytest.raises(InvalidParameterError, match=r"blk\.w.*multiple of 32"):
        get_format("q4_0").quantize(torch.randn(8, 40), "blk.w")
    with pytest.raises(InvalidParameterError, match="unknown weight format 'q3_9'"):
        get_format("q3_9")
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40))
    with pytest.raises(InvalidParameterError, match=r"1\.weight.*multiple of 32"):
        quantize_model(model, "q8_0")
    assert isinstance(model[0], nn.Linear)  # checked before any swap


# ---- GGUF packed loading (SmolLM2: Q4_1 linears, Q8_0 tied embedding) ----

@pytest.fixture(scope="module")
def smollm_pair(smollm_gguf):
    return load_model(smollm_gguf, packed=True), load_model(smollm_gguf)


def test_gguf_packed_keeps_blocks_and_memory(smollm_pair, smollm_gguf):
    packed, dense = smollm_pair
    m = packed.model
    assert not any(isinstance(mod, nn.Linear) for mod in m.modules())
    assert isinstance(m.embed_tokens, QuantizedEmbedding) and m.embed_tokens.fmt.name == "q8_0"
    assert m.logits_head.blocks is m.embed_tokens.blocks  # tied head shares the table
    qkv = m.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantizedLinear) and qkv.fmt.name == "q4_1"
    # permuted + stacked packed rows dequantize to exactly the float loader's weights
    for i in (0, 17):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            q = m.get_submodule(f"layers.{i}.{name}")
            assert torch.equal(q.fmt.dequantize(q.packed()), dense.model.get_submodule(f"layers.{i}.{name}").weight)
    ratio = model_nbytes(m) / model_nbytes(dense.model)
    assert ratio < 0.35, ratio
    # the row permutation on packed rows equals the float permutation (q: 9 heads, k: 3 heads)
    g = read_gguf(smollm_gguf)
    for gname, heads in (("blk.2.attn_q.weight", 9), ("blk.2.attn_k.weight", 3)):
        rows = packed_rows(g, PackedSource(gname, "Q4_1", None, heads))
        assert torch.equal(get_format("q4_1").dequantize_blocks(rows.reshape(-1, 20)).reshape(rows.shape[0], -1),
                           _unpermute_rows(g.load(gname), heads))
        assert not torch.equal(rows, packed_rows(g, PackedSource(gname, "Q4_1")))


def test_gguf_packed_logits_and_greedy_match_dense(smollm_pair):
    """Greedy 16 tokens with the dense model; the packed model, fed the same sequence, picks the same
    tokens at every position and its logits agree within 1e-4 (same weights after dequantization)."""
    packed, dense = smollm_pair
    for prompt in PROMPTS:
        gen = PagedRunner(dense.model).greedy(prompt, 16)
        seq = prompt + gen[:-1]
        ref = PagedRunner(dense.model).step(seq)
        got = PagedRunner(packed.model).step(seq)
        assert (got - ref).abs().max().item() < 1e-4
        assert got[len(prompt) - 1:].argmax(-1).tolist() == gen


@pytest.mark.slow
def test_gguf_packed_decode_generates_same_tokens(smollm_pair):
    packed, dense = smollm_pair
    for prompt in PROMPTS:
        assert PagedRunner(packed.model).greedy(prompt, 16) == PagedRunner(dense.model).greedy(prompt, 16)


def test_packed_requires_gguf(smollm_folder):
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(smollm_folder, packed=True)


# ---- quantized checkpoints ----

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_llama")
    build_and_save(cfg, str(path))
    return str(path)


@pytest.mark.parametrize("name", FORMATS)
def test_checkpoint_round_trip_tiny(name, tiny_folder, tmp_path):
    out = str(tmp_path / name)
    report = quantize_checkpoint(tiny_folder, out, name, {})
    assert set(report.modules) == {f"layers.{i}.{p}" for i in range(2)
                                   for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                             "mlp.down_proj")}
    assert report.skipped == ["lm_head"]
    dense = load_model(tiny_folder)
    loaded = load_quantized(out)
    fmt = get_format(name)
    q = loaded.model.layers[1].mlp.gate_up_proj
    assert torch.equal(q.blocks, fmt.quantize(dense.model.layers[1].mlp.gate_up_proj.weight).tensors["blocks"])
    quantize_model(dense.model, name)  # in memory: the loaded checkpoint must give the same logits
    tokens = [3, 17, 99, 5, 42]
    assert torch.equal(PagedRunner(loaded.model).step(tokens), PagedRunner(dense.model).step(tokens))
    cfg = json.load(open(os.path.join(out, QUANT_CONFIG_FILE)))
    assert cfg["scheme"] == name and cfg["modules"]["layers.0.self_attn.qkv_proj"]["shape"] == [128, 64]


def _tamper(src: str, dst, edit_tensors=None, edit_config=None) -> str:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, WEIGHTS_FILE))
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, os.path.join(dst, WEIGHTS_FILE))
    if edit_config:
        path = os.path.join(dst, QUANT_CONFIG_FILE)
        cfg = json.load(open(path))
        edit_config(cfg)
        json.dump(cfg, open(path, "w"))
    return str(dst)


def test_checkpoint_mismatches_raise_naming_tensor(tiny_folder, tmp_path):
    good = str(tmp_path / "good")
    quantize_checkpoint(tiny_folder, good, "q4_0", {})
    key = "layers.0.mlp.down_proj.blocks"
    cases = [
        (lambda t: t.pop(key), None, ModelLoadError, "layers.0.mlp.down_proj"),
        (lambda t: t.__setitem__(key, t[key][:, :-18].contiguous()), None, ModelLoadError,
         r"layers\.0\.mlp\.down_proj\.blocks.*uint8 \[64, 72\]"),
        (lambda t: t.__setitem__("layers.0.mlp.down_proj.extra", torch.zeros(1)), None, ModelLoadError,
         r"down_proj\.extra.*unexpected"),
        (lambda t: t.__setitem__("layers.0.mlp.bogus.weight", torch.zeros(1)), None, ModelLoadError,
         r"unexpected tensor 'layers\.0\.mlp\.bogus\.weight'"),
        (lambda t: t.pop("layers.1.input_layernorm.weight"), None, ModelLoadError,
         r"missing tensor 'layers\.1\.input_layernorm\.weight'"),
        (None, lambda c: c.__setitem__("scheme", "q9_9"), InvalidParameterError, "unknown scheme 'q9_9'"),
        (None, lambda c: c["modules"]["layers.0.self_attn.o_proj"].__setitem__("format", "zz"), ModelLoadError,
         r"layers\.0\.self_attn\.o_proj.*unknown weight format 'zz'"),
        (None, lambda c: c["modules"]["layers.0.self_attn.o_proj"].__setitem__("shape", [64, 128]),
         ModelLoadError, r"layers\.0\.self_attn\.o_proj"),
        (None, lambda c: c["modules"].pop("layers.0.self_attn.o_proj"), ModelLoadError,
         r"layers\.0\.self_attn\.o_proj\.blocks"),
    ]
    for i, (edit_t, edit_c, err, pattern) in enumerate(cases):
        with pytest.raises(err, match=pattern):
            load_quantized(_tamper(good, tmp_path / f"bad{i}", edit_t, edit_c))


def test_engine_quantization_choices(tiny_folder, tmp_path):
    from tierserve.config import ModelConfig

    with pytest.raises(InvalidParameterError, match="quantization"):
        ModelConfig(quantization="q3_9")
    assert ModelConfig(quantization="auto").quantization == "auto"
    out = str(tmp_path / "q8")
    quantize_checkpoint(tiny_folder, out, "q8_0", {})
    assert isinstance(load_for_engine(out, torch.float32, "auto").model.layers[0].mlp.down_proj, QuantizedLinear)
    with pytest.raises(InvalidParameterError, match="quantized with 'q8_0'"):
        load_for_engine(out, torch.float32, "q4_0")
    on_the_fly = load_for_engine(tiny_folder, torch.float32, "q4_1").model  # plain folder: quantized at load
    assert on_the_fly.layers[1].self_attn.o_proj.fmt.name == "q4_1"
    assert isinstance(on_the_fly.lm_head, nn.Linear)


def test_calibration_hook_passes_captured_activations(tiny_folder):
    seen = {}

    class _Probe(get_format("q8_0").__class__):
        name = "test_probe_calibrated"
        needs_calibration = True

        def quantize(self, weight, tensor_name="weight", activations=None):
            seen[tensor_name] = activations
            return super().quantize(weight, tensor_name)

    model = load_model(tiny_folder).model
    acts = capture_activations(model, lambda m: PagedRunner(m).step([3, 4, 5, 6]),
                               ["layers.0.mlp.down_proj", "layers.1.self_attn.qkv_proj"])
    assert acts["layers.0.mlp.down_proj"].shape == (4, 128) and acts["layers.1.self_attn.qkv_proj"].shape == (4, 64)
    assert not model.layers[0].mlp.down_proj._forward_pre_hooks  # hooks removed
    base.register_format(_Probe)
    try:
        with pytest.raises(InvalidParameterError, match="calibration"):
            quantize_model(load_model(tiny_folder).model, _Probe.name)
        quantize_model(model, _Probe.name, skip=("lm_head", "layers.1.*", "layers.0.self_attn.*",
                                                 "layers.0.mlp.gate_up_proj"), calibration=acts)
    finally:
        base.WEIGHT_FORMATS.pop(_Probe.name)
    assert list(seen) == ["layers.0.mlp.down_proj.weight"]
    assert seen["layers.0.mlp.down_proj.weight"] is acts["layers.0.mlp.down_proj"]


def test_quantized_embedding_rows():
    fmt = get_format("q8_0")
    table = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    emb = QuantizedEmbedding(fmt, fmt.quantize(table), torch.float32)
    ids = torch.tensor([[4, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), fmt.dequantize(emb.packed())[ids])


# ---- real model: quantize --scheme q4_0 of the SmolLM2 folder, load, generate ----

@pytest.mark.slow
def test_smollm_q4_0_checkpoint_generates(smollm_folder, tmp_path):
    from tierserve.cli import main

    out = str(tmp_path / "smollm_q4_0")
    assert main(["quantize", "--scheme", "q4_0", "--model", smollm_folder, "--out", out]) == 0
    dense = load_model(smollm_folder).model
    quant = load_quantized(out).model
    seq = PROMPTS[0] + PagedRunner(dense).greedy(PROMPTS[0], 8)
    ref, got = PagedRunner(dense).step(seq), PagedRunner(quant).step(seq)
    diff = (got - ref).abs().max().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"SmolLM2 q4_0 checkpoint vs fp32: max |logit diff| {diff:.3f}, KL {kl:.4f}, top-1 agreement {agree:.2f}")
    # The independent oracle: the float model with every quantized weight replaced by gguf-py's Q4_0
    # round trip. Both compute in float32 from the same dequantized weights, so they differ by summation
    # order only: 2 sqrt(K) u32 per linear (K <= 1536: 4.6e-6 of its magnitude) carried through 30 layers.
    oracle = load_model(smollm_folder).model
    dense_params = dict(oracle.named_parameters())
    n_quant = 0
    for name, mod in quant.named_modules():
        if isinstance(mod, QuantizedLinear):
            w = dense_params[name + ".weight"].detach()
            blocks = gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_0)
            with torch.no_grad():
                w.copy_(torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType.Q4_0)).reshape(w.shape))
            n_quant += 1
    assert n_quant == 30 * 4  # qkv, o, gate_up, down of every layer
    want = PagedRunner(oracle).step(seq)
    rel = (got - want).abs().max().item() / want.abs().max().item()
    print(f"checkpoint vs gguf-py Q4_0 oracle: relative max |logit diff| {rel:.2e}")
    assert rel <= 1e-4, rel  # measured 0 (same order); a wrong code or scale moves logits by > 1e-2
    # quality against fp32, measured: max diff 11.7, KL 0.49, agreement 0.47 (symmetric Q4_0 over SmolLM2's
    # asymmetric Q4_1 grid). The oracle fixes the values; these bounds sit 1.3x / 0.85x from the measurements.
    assert 0.3 < kl < 0.65 and agree >= 0.4, (kl, agree)
    lossless = load_model(smollm_folder).model  # q4_1 re-quantizes the Q4_1 grid exactly
    quantize_model(lossless, "q4_1")
    assert torch.equal(PagedRunner(lossless).step(seq), ref)
    from tierserve import LLM, SamplingParams

    outs = LLM(out, quantization="auto", num_blocks=64, max_num_seqs=2).generate(
        ["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(outs[0].token_ids) == 4
