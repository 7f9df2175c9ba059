"""Llama-family decoders: Llama (SmolLM2), Mistral, Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm).

``DecoderLM`` is the pre-norm decoder all of them (and the MoE families in
``mixtral.py``, ``qwen_moe.py``, ``olmoe.py``) share:

    h = embed(ids)
    per layer:  h = h + attn(input_layernorm(h));  h = h + mlp(post_attention_layernorm(h))
    hidden = norm(h)

Architectures differ only through class hooks: ``qk_norm`` ("none", "per_head",
"full"), ``qkv_bias``/``o_bias`` (which projections carry a bias), and
``make_mlp`` / ``mlp_slots`` (dense GatedMLP here; a SparseMoeBlock in the MoE
families). RoPE cos/sin are looked up once per step and shared by all layers.
``compile_decoder`` (``decode_compile.py``) may install compiled dense segments;
``forward`` then runs them, and ``forward_eager`` stays the reference.
Sliding-window layers (Mistral, Qwen2 ``layer_types``) pass their window to
paged attention.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.attention import Attention
from tierserve.models.base import CausalLMBase
from tierserve.models.context import ForwardContext
from tierserve.models.layers import GatedMLP, RMSNorm, Slot
from tierserve.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderLM(CausalLMBase):
    """Pre-norm RoPE decoder; subclasses set the architecture hooks below."""

    qk_norm = "none"

    def qkv_bias(self, cfg: ModelArchConfig) -> bool:
        return cfg.attention_bias

    def o_bias(self, cfg: ModelArchConfig) -> bool:
        return cfg.attention_bias

    def make_mlp(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, bias=cfg.mlp_bias)

    def mlp_slots(self, layer_idx: int, mlp: nn.Module, prefix: str) -> dict[str, Slot]:
        return mlp.hf_slots(prefix + "mlp.")

    def __init__(self, cfg: ModelArchConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, dtype)
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(
                Attention(cfg, i, dtype, qkv_bias=self.qkv_bias(cfg), o_bias=self.o_bias(cfg), qk_norm=self.qk_norm),
                self.make_mlp(cfg, i, dtype), cfg.hidden_size, cfg.rms_norm_eps, dtype)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        compiled = self.__dict__.get("compiled_decode")  # models/decode_compile.py, when installed
        if compiled is not None:
            return compiled.forward(input_ids, positions, ctx)
        return self.forward_eager(input_ids, positions, ctx)

    def forward_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The reference forward (the compiled one is tested against it)."""
        self.rope.ensure(max(ctx.attn.seq_lens))
        cos, sin = self.rope.lookup(positions, self.dtype)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)

    def hf_slots(self) -> dict[str, Slot]:
        slots = super().hf_slots()
        slots.update(self.norm.hf_slots("model.norm"))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            slots.update(layer.self_attn.hf_slots(prefix + "self_attn."))
            slots.update(layer.input_layernorm.hf_slots(prefix + "input_layernorm"))
            slots.update(layer.post_attention_layernorm.hf_slots(prefix + "post_attention_layernorm"))
            slots.update(self.mlp_slots(i, layer.mlp, prefix))
        return slots


class LlamaForCausalLM(DecoderLM):
    """Llama 2/3 (incl. llama3 rope scaling), SmolLM2, Mistral."""


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2: bias on q/k/v (always), none on o_proj."""

    def qkv_bias(self, cfg: ModelArchConfig) -> bool:
        return True

    def o_bias(self, cfg: ModelArchConfig) -> bool:
        return False


class Qwen3ForCausalLM(DecoderLM):
    """Qwen3: RMSNorm over each head's q and k before RoPE."""

    qk_norm = "per_head"
