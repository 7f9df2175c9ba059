"""Tiny random-weight models of every supported architecture against transformers (the reference).

For each architecture a transformers model is built from a small config
(hidden 64, GQA, 2-3 layers, 4-8 experts top-2 for MoE), its parameters
perturbed with seeded noise, saved with ``save_pretrained`` and loaded with
``load_model``. Checks: (a) prefill logits of a 20-token prompt, run through
a shuffled block table with block_size 4, match transformers' within 1e-4;
(b) a 32-token greedy continuation (prefill then one token per step) equals
``generate(do_sample=False)``; (c) the prompt prefilled in 3 chunks gives the
same logits as in one step within 1e-5; (d) two sequences of different lengths
batched in one prefill step and one decode step match separate runs. Also the
loader's GGUF path on the real SmolLM2-135M vs transformers' GGUF loading, RoPE vs ``ROPE_INIT_FUNCTIONS``,
config parsing vs transformers' own rope standardisation, and loader errors.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from model_harness import PagedRunner, build_and_save
from safetensors.torch import load_file, save_file
from transformers import (Gemma3TextConfig, LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2Config,
                          Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tierserve.errors import ModelLoadError
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.context import ForwardContext
from tierserve.models.loader import load_model
from tierserve.models.registry import supported_architectures
from tierserve.models.rope import RopeSpec, RotaryEmbedding, apply_rope, compute_inv_freq

VOCAB = 384
PROMPT_LEN = 20
NEW_TOKENS = 32
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=48)

CONFIGS = {
    "llama3_rope_tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=24),
    # untied: a tied random Gemma collapses to repeating one token, which would make (b) weak
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, tie_word_embeddings=False, sliding_window=8, query_pre_attn_scalar=24,
                                       final_logit_softcapping=3.0,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "mixtral_sliding": lambda: MixtralConfig(**{**COMMON, "num_hidden_layers": 2}, num_local_experts=6,
                                             num_experts_per_tok=2, sliding_window=12),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **MOE, num_experts=8, norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**{**COMMON, "num_hidden_layers": 2}, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe_shared": lambda: Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=80,
                                               mlp_only_layers=[1]),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_and_save(CONFIGS[request.param](), path, seed=sorted(CONFIGS).index(request.param))
    return hf, load_model(str(path)), path


def _prompt(seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()


def test_prefill_logits_match_transformers(pair):
    hf, loaded, _ = pair
    prompt = _prompt()
    ours = PagedRunner(loaded.model, block_size=4).step(prompt)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == ref.shape == (PROMPT_LEN, VOCAB)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_continuation_matches_generate(pair):
    hf, loaded, _ = pair
    prompt = _prompt(2)
    ours = PagedRunner(loaded.model, block_size=4, seed=3).greedy(prompt, NEW_TOKENS)
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LEN:]
    assert ours == ref.tolist()


def test_chunked_prefill_equals_one_shot(pair):
    _, loaded, _ = pair
    prompt = _prompt(3)
    one_shot = PagedRunner(loaded.model, block_size=4, seed=5).step(prompt)
    runner = PagedRunner(loaded.model, block_size=4, seed=6)
    chunks = [runner.step(prompt[a:b]) for a, b in ((0, 7), (7, 13), (13, PROMPT_LEN))]
    assert (torch.cat(chunks) - one_shot).abs().max().item() <= 1e-5



def test_two_sequences_in_one_step_match_separate_runs(pair):
    """Prefill of two prompts of different lengths in one step, then a batched decode step."""
    _, loaded, _ = pair
    model = loaded.model
    a, b = _prompt(4)[:9], _prompt(5)[:14]
    runner = PagedRunner(model, block_size=4, seed=7)
    tables = [runner.table[:4], runner.table[4:10]]  # disjoint, shuffled pages

    def step(query_lens, seq_lens, tokens):
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, 4)
        positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
        with torch.inference_mode():
            hidden = model(torch.tensor(tokens), positions, ForwardContext(meta, runner.kv))
        return model.compute_logits(hidden)

    prefill = step([9, 14], [9, 14], a + b)
    decode = step([1, 1], [10, 15], [7, 11])
    for prompt, nxt, rows, drow in ((a, 7, slice(0, 9), 0), (b, 11, slice(9, 23), 1)):
        alone = PagedRunner(model, block_size=4, seed=8)
        assert (alone.step(prompt) - prefill[rows]).abs().max().item() <= 1e-5
        assert (alone.step([nxt])[0] - decode[drow]).abs().max().item() <= 1e-5


def test_real_smollm2_gguf_logits_match_transformers(smollm_gguf, hf_smollm):
    """The loader's GGUF path on the real SmolLM2-135M against transformers' own GGUF loading."""
    loaded = load_model(smollm_gguf)
    assert loaded.source == "gguf" and loaded.arch.tie_word_embeddings
    hf, tok = hf_smollm
    ids = tok("Elizabeth Bennet walked to Netherfield because")["input_ids"]
    ours = PagedRunner(loaded.model, block_size=4, num_blocks=8).step(ids)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() <= 1e-4

# --- RoPE against transformers ------------------------------------------------------------------

ROPE_CASES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 40.0, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.0, "mscale_all_dim": 0.5, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "attention_factor": 0.9, "truncate": False,
     "original_max_position_embeddings": 2048},
]


def _llama_cfg(params: dict, head_dim: int = 64) -> LlamaConfig:
    return LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=16384,
                       rope_parameters=dict(params))


@pytest.mark.parametrize("params", ROPE_CASES, ids=lambda p: p["rope_type"] + str(len(p)))
def test_rope_inv_freq_and_scaling_match_transformers(params):
    cfg = _llama_cfg(params)
    if params["rope_type"] == "default":
        ref_inv, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg)
    spec = RopeSpec.from_hf(params, 10000.0, 16384)
    inv, scale = compute_inv_freq(spec, 64)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert math.isclose(scale, ref_scale, rel_tol=1e-9)


@pytest.mark.parametrize("params", [ROPE_CASES[2], ROPE_CASES[4]], ids=["llama3", "yarn"])
def test_rotary_tables_and_rotation_match_transformers(params):
    cfg = _llama_cfg({**params}, head_dim=32)
    cfg.max_position_embeddings = 64  # tables start small and must grow
    ref_rope = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(RopeSpec.from_hf(params, 10000.0, 64), 32, 64)
    positions = torch.tensor([0, 5, 63, 64, 200, 131, 7])
    ours.ensure(int(positions.max()) + 1)
    assert ours.cos_table.shape[0] >= 201
    q, k = torch.randn(len(positions), 4, 32), torch.randn(len(positions), 2, 32)
    cos, sin = ours.lookup(positions, torch.float32)
    ref_cos, ref_sin = ref_rope(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# --- config parsing -----------------------------------------------------------------------------

def _base_dict(**extra) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
    d.update(extra)
    return d


def test_legacy_rope_keys_parse_like_transformers():
    legacy = _base_dict(rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 2.0})
    arch = ModelArchConfig.from_hf(legacy)
    ref = LlamaConfig(**{k: v for k, v in legacy.items() if k != "architectures"}).rope_parameters
    assert (arch.rope.rope_type, arch.rope.theta, arch.rope.factor) == (
        ref["rope_type"], ref["rope_theta"], ref["factor"])
    assert arch.num_key_value_heads == 4 and arch.head_dim == 8 and arch.local_rope is None
    assert arch.layer_types == ("full_attention",) * 2 and arch.sliding_window is None


def test_gemma3_legacy_and_v5_rope_agree():
    legacy = _base_dict(architectures=["Gemma3ForCausalLM"], rope_theta=1e6, rope_local_base_freq=1e4,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        rope_scaling={"rope_type": "linear", "factor": 8.0})
    v5 = Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "architectures"}).to_dict()
    v5["architectures"] = legacy["architectures"]
    a, b = ModelArchConfig.from_hf(legacy), ModelArchConfig.from_hf(v5)
    assert a.rope == b.rope and a.rope.rope_type == "linear" and a.rope.theta == 1e6
    assert a.local_rope.theta == b.local_rope.theta == 1e4 and b.local_rope.rope_type == "default"
    assert a.window(0) == 4 and a.window(1) is None


def test_missing_required_key_is_named():
    d = _base_dict()
    del d["num_attention_heads"]
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        ModelArchConfig.from_hf(d)


# --- loader errors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_err")
    build_and_save(CONFIGS["qwen2"](), path)
    return path


def _copy_with(src, dst, config_edit=None, tensors_edit=None):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_unknown_architecture_lists_supported(llama_dir, tmp_path):
    _copy_with(llama_dir, tmp_path, config_edit=lambda c: c.update(architectures=["FancyNetForCausalLM"]))
    with pytest.raises(ModelLoadError, match="FancyNetForCausalLM") as exc:
        load_model(str(tmp_path))
    assert all(name in str(exc.value) for name in supported_architectures())


def test_missing_tensor_is_named(llama_dir, tmp_path):
    _copy_with(llama_dir, tmp_path, tensors_edit=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(str(tmp_path))


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    _copy_with(llama_dir, tmp_path, tensors_edit=lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match=r"model\.extra\.weight"):
        load_model(str(tmp_path))


def test_wrong_shape_names_tensor_and_both_shapes(llama_dir, tmp_path):
    _copy_with(llama_dir, tmp_path, tensors_edit=lambda t: t.update(
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(ModelLoadError, match=r"up_proj\.weight.*\[95, 64\].*\[96, 64\]"):
        load_model(str(tmp_path))


def test_nonexistent_path_is_named(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_model(missing)


def test_sharded_checkpoint_and_bf16_load(llama_dir, tmp_path):
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: tensors[k].to(torch.bfloat16) for k in keys}, os.path.join(tmp_path, file))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: file for file, keys in halves.items() for k in keys}}, f)
    with open(os.path.join(llama_dir, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    loaded = load_model(str(tmp_path), dtype=torch.float32)
    w = loaded.model.layers[0].self_attn.qkv_proj.weight
    assert w.dtype == torch.float32 and loaded.source == "safetensors"
    q_rows = loaded.arch.num_attention_heads * loaded.arch.head_dim
    assert torch.equal(w[:q_rows], tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16).float())
