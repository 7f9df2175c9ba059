"""GGUF -> Hugging Face: config.json dict and parameter names/values.

Architectures (``general.architecture``), chosen through the ``ARCHS`` registry:
  llama    -> LlamaForCausalLM (SmolLM2); with ``llama.expert_count`` > 0 -> MixtralForCausalLM
  qwen2    -> Qwen2ForCausalLM      qwen3 -> Qwen3ForCausalLM
  qwen2moe -> Qwen2MoeForCausalLM   qwen3moe -> Qwen3MoeForCausalLM
  gemma3   -> Gemma3ForCausalLM (model_type gemma3_text; the GGUF holds the text model only)

Tensor transforms that undo llama.cpp's converter (convert_hf_to_gguf.py):
  * llama/mixtral q and k rows were permuted for ggml's interleaved rotary:
    W.reshape(H, 2, d/2, in).swapaxes(1, 2); we apply the inverse
    W.reshape(H, d/2, 2, in).swapaxes(1, 2), with H = num_attention_heads for q
    and num_key_value_heads for k (the same as transformers' GGUF loader).
  * gemma3 stores every ``*norm.weight`` as w + 1 (Gemma's RMSNorm multiplies by
    1 + w); we subtract 1 in float32, as transformers does.
  * MoE expert tensors ``ffn_{gate,up,down}_exps`` (shape E x out x in) are split
    into per-expert HF names; qwen2moe's ``ffn_gate_inp_shexp`` (hidden,) becomes
    ``shared_expert_gate.weight`` (1, hidden).

Config rules: head_dim = ``attention.key_length`` if present else
hidden_size / num_attention_heads; rope as transformers-5 ``rope_parameters``
(linear rope scaling carried over); tie_word_embeddings is true iff the file has
no ``output.weight``. Gemma3 follows llama.cpp's gemma3 graph: every 6th layer
(i % 6 == 5) is full attention, the others slide over ``attention.sliding_window``
tokens with rope base 10000; query_pre_attn_scalar = head_dim except the 62-layer
27B model, which uses hidden_size / num_attention_heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from tierserve.errors import ModelLoadError
from tierserve.models.gguf.reader import GGUFFile

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER = {**_COMMON_LAYER, "ffn_norm": "pre_feedforward_layernorm",
                 "post_attention_norm": "post_attention_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_QWEN_MOE_LAYER = {**_COMMON_LAYER, "ffn_gate_inp": "mlp.gate",
                   "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                   "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_QWEN_EXPERTS = {"ffn_gate_exps": "mlp.experts.{e}.gate_proj", "ffn_up_exps": "mlp.experts.{e}.up_proj",
                 "ffn_down_exps": "mlp.experts.{e}.down_proj"}
_MIXTRAL_LAYER = {**_COMMON_LAYER, "ffn_gate_inp": "block_sparse_moe.gate"}
_MIXTRAL_EXPERTS = {"ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                    "ffn_down_exps": "block_sparse_moe.experts.{e}.w2",
                    "ffn_up_exps": "block_sparse_moe.experts.{e}.w3"}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps to HF: class names, layer names, transforms, extra config."""

    model_type: str
    architecture: str
    layer_names: dict[str, str]
    expert_names: dict[str, str] = field(default_factory=dict)
    permute_qk: bool = False
    norm_offset: float = 0.0
    activation: tuple[str, str] = ("hidden_act", "silu")
    extra_config: Callable[[GGUFFile, str, dict], dict] = lambda g, p, base: {}


def _meta(g: GGUFFile, key: str, default: Any = ...) -> Any:
    if key in g.metadata:
        return g.metadata[key]
    if default is ...:
        raise ModelLoadError(f"GGUF file {g.path} lacks metadata key {key!r} needed for the HF config")
    return default


def _per_layer(g: GGUFFile, key: str) -> int:
    """A head count that may be stored per layer; a list must hold one value."""
    value = _meta(g, key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"GGUF {key} varies per layer ({sorted(set(value))}); tierserve needs one value")
        value = value[0]
    return int(value)


def _rope(g: GGUFFile, p: str, theta: float) -> dict:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if _meta(g, p + "rope.scaling.type", None) == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(_meta(g, p + "rope.scaling.factor"))}
    return rope


def _moe_config(g: GGUFFile, p: str, base: dict) -> dict:
    out = {"num_experts": _meta(g, p + "expert_count"), "num_experts_per_tok": _meta(g, p + "expert_used_count"),
           "moe_intermediate_size": _meta(g, p + "expert_feed_forward_length"),
           "decoder_sparse_step": 1, "mlp_only_layers": []}
    if p + "expert_shared_feed_forward_length" in g.metadata:
        out["shared_expert_intermediate_size"] = g.metadata[p + "expert_shared_feed_forward_length"]
    out["norm_topk_prob"] = base["model_type"] == "qwen3_moe"
    return out


def _mixtral_config(g: GGUFFile, p: str, base: dict) -> dict:
    return {"num_local_experts": _meta(g, p + "expert_count"),
            "num_experts_per_tok": _meta(g, p + "expert_used_count")}


def _gemma3_config(g: GGUFFile, p: str, base: dict) -> dict:
    n_layers, head_dim = base["num_hidden_layers"], base["head_dim"]
    scalar = base["hidden_size"] // base["num_attention_heads"] if n_layers == 62 else head_dim
    full = _rope(g, p, base["rope_parameters"]["rope_theta"])
    return {
        "sliding_window": _meta(g, p + "attention.sliding_window"),
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n_layers)],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": full},
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": _meta(g, p + "final_logit_softcapping", None),
        "attn_logit_softcapping": _meta(g, p + "attn_logit_softcapping", None),
    }


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "LlamaForCausalLM", _COMMON_LAYER, permute_qk=True),
    "mixtral": ArchSpec("mixtral", "MixtralForCausalLM", _MIXTRAL_LAYER, _MIXTRAL_EXPERTS,
                        permute_qk=True, extra_config=_mixtral_config),
    "qwen2": ArchSpec("qwen2", "Qwen2ForCausalLM", _COMMON_LAYER),
    "qwen3": ArchSpec("qwen3", "Qwen3ForCausalLM", _COMMON_LAYER),
    "qwen2moe": ArchSpec("qwen2_moe", "Qwen2MoeForCausalLM", _QWEN_MOE_LAYER, _QWEN_EXPERTS,
                         extra_config=_moe_config),
    "qwen3moe": ArchSpec("qwen3_moe", "Qwen3MoeForCausalLM", _QWEN_MOE_LAYER, _QWEN_EXPERTS,
                         extra_config=_moe_config),
    "gemma3": ArchSpec("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_LAYER, norm_offset=1.0,
                       activation=("hidden_activation", "gelu_pytorch_tanh"), extra_config=_gemma3_config),
}


def _arch(g: GGUFFile) -> tuple[str, ArchSpec]:
    """(metadata prefix, spec). A llama file with experts is Mixtral."""
    gguf_arch = _meta(g, "general.architecture")
    key = "mixtral" if gguf_arch == "llama" and _meta(g, "llama.expert_count", 0) else gguf_arch
    spec = ARCHS.get(key)
    if spec is None:
        raise ModelLoadError(
            f"GGUF architecture {gguf_arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
    return gguf_arch + ".", spec


def gguf_to_hf_config(g: GGUFFile) -> dict:
    """An HF ``config.json`` dict for the model in ``g`` (transformers-5 conventions)."""
    p, spec = _arch(g)
    hidden, heads = int(_meta(g, p + "embedding_length")), _per_layer(g, p + "attention.head_count")
    vocab = _meta(g, p + "vocab_size", None) or len(_meta(g, "tokenizer.ggml.tokens"))
    names = {t.name for t in g.tensors}
    config: dict[str, Any] = {
        "model_type": spec.model_type, "architectures": [spec.architecture],
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(_meta(g, p + "feed_forward_length", 0) or _meta(g, p + "expert_feed_forward_length")),
        "num_hidden_layers": int(_meta(g, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _per_layer(g, p + "attention.head_count_kv") if p + "attention.head_count_kv" in g.metadata else heads,
        "head_dim": int(_meta(g, p + "attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_meta(g, p + "attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(_meta(g, p + "context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        spec.activation[0]: spec.activation[1],
        "attention_bias": "blk.0.attn_q.bias" in names,
        "dtype": "float32",
    }
    config["rope_parameters"] = _rope(g, p, float(_meta(g, p + "rope.freq_base", 10000.0)))
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id"), ("unknown_token_id", "unk_token_id")):
        if f"tokenizer.ggml.{key}" in g.metadata:
            config[hf_key] = int(g.metadata[f"tokenizer.ggml.{key}"])
    config.update(spec.extra_config(g, p, config))
    return config


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's rotary row permutation (works for weights and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


def iter_gguf_hf_tensors(g: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, float32 tensor) for every tensor in ``g``, one GGUF tensor at a time.

    Expert tensors yield one entry per expert (views of the decoded stack).
    Unknown tensor names raise ModelLoadError rather than being dropped silently.
    """
    _, spec = _arch(g)
    config = gguf_to_hf_config(g)
    for info in g.tensors:
        if info.name in _GLOBAL_NAMES:
            w = g.load(info.name)
            if spec.norm_offset and info.name == "output_norm.weight":
                w = w - spec.norm_offset
            yield _GLOBAL_NAMES[info.name], w
            continue
        m = _LAYER_RE.fullmatch(info.name)
        if m is None or (m[2] not in spec.layer_names and m[2] not in spec.expert_names):
            raise ModelLoadError(f"GGUF tensor {info.name!r} has no HF name for architecture {spec.model_type}")
        layer, part, kind = m[1], m[2], m[3]
        w = g.load(info.name)
        if spec.permute_qk and part in ("attn_q", "attn_k"):
            w = _unpermute_rows(w, config["num_attention_heads"] if part == "attn_q" else config["num_key_value_heads"])
        if spec.norm_offset and part.endswith("norm") and kind == "weight":
            w = w - spec.norm_offset
        if part in spec.expert_names:
            for e in range(w.shape[0]):
                yield f"model.layers.{layer}.{spec.expert_names[part].format(e=e)}.{kind}", w[e]
            continue
        if part == "ffn_gate_inp_shexp":
            w = w.reshape(1, -1)
        yield f"model.layers.{layer}.{spec.layer_names[part]}.{kind}", w
