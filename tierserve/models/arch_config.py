"""ModelArchConfig: the architecture fields every supported model needs, parsed from HF config.json.

``ModelArchConfig.from_hf(d)`` reads a config.json dict as written by
transformers 5 (``rope_parameters``, possibly nested per layer type as Gemma3
writes it) or by older versions (``rope_theta`` + ``rope_scaling`` with a
``type`` or ``rope_type`` key, Gemma3's ``rope_local_base_freq``). Required keys
(``architectures``, ``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``)
raise ModelLoadError naming the key when absent; the rest default as in
transformers.

Attention layer types: ``layer_types`` when present (each ``full_attention`` or
``sliding_attention``); otherwise every layer slides when ``sliding_window`` is
set (non-zero) and ``use_sliding_window`` is not false (Mistral, Mixtral,
Qwen3-MoE), else every layer is full. Sliding layers use ``local_rope`` when the
config gives one (Gemma3), else ``rope``.

MoE layers: layer ``i`` is sparse iff ``num_experts > 0``, ``i`` is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (Qwen-MoE rule;
Mixtral/OLMoE configs have neither key, so every layer is sparse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tierserve.errors import ModelLoadError
from tierserve.models.rope import RopeSpec

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings")


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope: RopeSpec
    local_rope: RopeSpec | None
    layer_types: tuple[str, ...]
    sliding_window: int | None
    attention_bias: bool
    qkv_bias: bool | None  # Qwen2-MoE's explicit key; None when absent
    mlp_bias: bool
    attn_scale: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    clip_qkv: float | None
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "decoder_sparse_step"):
            if getattr(self, name) < 1:
                raise ModelLoadError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                 f"num_key_value_heads ({self.num_key_value_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                                 f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if bad:
            raise ModelLoadError(f"layer_types has unsupported entries {bad}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ModelLoadError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ModelLoadError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                     f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ModelLoadError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")

    def is_sliding(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == SLIDING_ATTENTION

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.is_sliding(layer_idx) else None

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelArchConfig":
        archs = d.get("architectures")
        if not archs:
            raise ModelLoadError("config.json is missing required key 'architectures'")
        for key in _REQUIRED:
            if d.get(key) is None:
                raise ModelLoadError(f"config.json is missing required key {key!r}")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        layers = int(d["num_hidden_layers"])
        head_dim = int(d.get("head_dim") or hidden // heads)
        max_pos = int(d["max_position_embeddings"])
        rope, local_rope = _parse_rope(d, max_pos)
        layer_types, window = _parse_layer_types(d, layers)
        scalar = d.get("query_pre_attn_scalar")
        num_experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
        return cls(
            architecture=str(archs[0]), model_type=str(d.get("model_type", "")),
            vocab_size=int(d["vocab_size"]), hidden_size=hidden, intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads), head_dim=head_dim,
            max_position_embeddings=max_pos, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            hidden_act=str(d.get("hidden_activation") or d.get("hidden_act") or "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope=rope, local_rope=local_rope, layer_types=layer_types, sliding_window=window,
            attention_bias=bool(d.get("attention_bias", False)),
            qkv_bias=None if d.get("qkv_bias") is None else bool(d["qkv_bias"]),
            mlp_bias=bool(d.get("mlp_bias", False)),
            attn_scale=(float(scalar) ** -0.5) if scalar else 1.0 / math.sqrt(head_dim),
            attn_logit_softcapping=_opt_float(d.get("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")),
            clip_qkv=_opt_float(d.get("clip_qkv")),
            num_experts=num_experts, num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
            decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
        )


def _opt_float(value) -> float | None:
    return None if value is None else float(value)


def _parse_rope(d: dict, max_pos: int) -> tuple[RopeSpec, RopeSpec | None]:
    """(global rope, local rope or None) from transformers 5 or legacy keys."""
    params = d.get("rope_parameters")
    theta = float(d.get("rope_theta") or 10000.0)
    if isinstance(params, dict) and FULL_ATTENTION in params:  # nested per layer type (Gemma3)
        full = RopeSpec.from_hf(params[FULL_ATTENTION], theta, max_pos)
        local = params.get(SLIDING_ATTENTION)
        return full, (RopeSpec.from_hf(local, theta, max_pos) if local else None)
    if not params:
        params = d.get("rope_scaling") or {}
    full = RopeSpec.from_hf(params, theta, max_pos)
    local_base = d.get("rope_local_base_freq")
    return full, (RopeSpec(theta=float(local_base)) if local_base else None)


def _parse_layer_types(d: dict, layers: int) -> tuple[tuple[str, ...], int | None]:
    window = d.get("sliding_window") or None
    types = d.get("layer_types")
    if types:
        types = tuple(str(t) for t in types)
    elif window and d.get("use_sliding_window", True) is not False:
        types = (SLIDING_ATTENTION,) * layers
    else:
        types = (FULL_ATTENTION,) * layers
    if SLIDING_ATTENTION not in types:
        window = None
    return types, (int(window) if window else None)
