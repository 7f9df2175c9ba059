"""Qwen2-MoE and Qwen3-MoE: sparse MoE blocks (HF ``mlp.gate``, ``mlp.experts.N.*``).

Layer ``i`` is sparse per ``ModelArchConfig.is_moe_layer`` (``mlp_only_layers``,
``decoder_sparse_step``); other layers use a dense GatedMLP of
``intermediate_size``. Experts have ``moe_intermediate_size``. The top-k weights
are renormalised iff ``norm_topk_prob``.

- Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm, ``attention_bias``).
- Qwen2-MoE: Qwen2 attention (q/k/v bias unless ``qkv_bias`` is false, no o bias)
  plus a shared expert of ``shared_expert_intermediate_size`` gated per token by
  ``sigmoid(shared_expert_gate(x))`` and added to the routed output.
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.layers import GatedMLP
from tierserve.models.llama import DecoderLM
from tierserve.models.moe import SparseMoeBlock


class _QwenMoeLM(DecoderLM):
    shared_expert = False

    def make_mlp(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        if not cfg.is_moe_layer(layer_idx):
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype)
        shared = cfg.shared_expert_intermediate_size if self.shared_expert else 0
        return SparseMoeBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                              cfg.norm_topk_prob, cfg.hidden_act, dtype, shared_intermediate=shared)


class Qwen3MoeForCausalLM(_QwenMoeLM):
    qk_norm = "per_head"


class Qwen2MoeForCausalLM(_QwenMoeLM):
    shared_expert = True

    def qkv_bias(self, cfg: ModelArchConfig) -> bool:
        return True if cfg.qkv_bias is None else cfg.qkv_bias

    def o_bias(self, cfg: ModelArchConfig) -> bool:
        return False
