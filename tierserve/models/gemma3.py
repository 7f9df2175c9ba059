"""Gemma3 text decoder (``Gemma3ForCausalLM``, e.g. gemma-3-270m).

Differences from the Llama decoder:

- the embedding is scaled by ``sqrt(hidden_size)``, the scale rounded to the model
  dtype first (as HF does: ``embed * tensor(sqrt(H)).to(dtype)``);
- every RMSNorm multiplies by ``(1 + w)`` in float32 (``RMSNorm(unit_offset=True)``);
- per-head q/k norm; attention scale ``query_pre_attn_scalar ** -0.5``; optional
  ``attn_logit_softcapping`` and ``final_logit_softcapping``;
- four norms per layer ("sandwich"):
  ``h = h + post_attention_layernorm(attn(input_layernorm(h)))``,
  ``h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``;
- GeGLU MLP with ``gelu_pytorch_tanh``;
- ``layer_types``: sliding layers attend over the last ``sliding_window`` keys and
  use the local RoPE (``rope_parameters["sliding_attention"]`` or legacy
  ``rope_local_base_freq``, default base 10000); full layers use the global RoPE
  (``rope_theta`` with its scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.attention import Attention
from tierserve.models.base import CausalLMBase
from tierserve.models.context import ForwardContext
from tierserve.models.layers import GatedMLP, RMSNorm, Slot
from tierserve.models.rope import RopeSpec, RotaryEmbedding

_GEMMA_LOCAL_BASE = 10000.0


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.is_sliding = cfg.is_sliding(layer_idx)
        self.self_attn = Attention(cfg, layer_idx, dtype, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias,
                                   qk_norm="per_head", gemma_norm=True)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype)
        norm_names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm")
        for name in norm_names:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, unit_offset=True))
        self.norm_names = norm_names

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, ctx))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(CausalLMBase):
    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, dtype)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(cfg.hidden_size)).to(dtype), persistent=False)
        local = cfg.local_rope or RopeSpec(theta=_GEMMA_LOCAL_BASE)
        self.global_rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.local_rope = RotaryEmbedding(local, cfg.head_dim, cfg.max_position_embeddings)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, unit_offset=True)

    def layer_rope(self, layer_idx: int) -> RotaryEmbedding:
        """The RoPE table layer ``layer_idx`` applies: local on sliding layers, global on full ones (read by the
        KV formats that re-apply RoPE when they rematerialise keys, cache/compress/xquant.py)."""
        return self.local_rope if self.layers[layer_idx].is_sliding else self.global_rope

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        needed = max(ctx.attn.seq_lens)
        self.global_rope.ensure(needed)
        self.local_rope.ensure(needed)
        rope_global = self.global_rope.lookup(positions, self.dtype)
        rope_local = self.local_rope.lookup(positions, self.dtype)
        h = self.embed_tokens(input_ids) * self.embed_scale
        for layer in self.layers:
            cos, sin = rope_local if layer.is_sliding else rope_global
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def hf_slots(self) -> dict[str, Slot]:
        slots = super().hf_slots()
        slots.update(self.norm.hf_slots("model.norm"))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            slots.update(layer.self_attn.hf_slots(prefix + "self_attn."))
            slots.update(layer.mlp.hf_slots(prefix + "mlp."))
            for name in layer.norm_names:
                slots.update(getattr(layer, name).hf_slots(prefix + name))
        return slots
