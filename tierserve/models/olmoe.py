"""OLMoE: q/k RMSNorm over the whole q and k projections (not per head), optional
``clip_qkv`` clamping of q/k/v, and a sparse MoE block in every layer (HF
``mlp.gate``, ``mlp.experts.N.*``) whose top-k weights are renormalised only if
``norm_topk_prob`` (false by default).
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.llama import DecoderLM
from tierserve.models.moe import SparseMoeBlock


class OlmoeForCausalLM(DecoderLM):
    qk_norm = "full"

    def make_mlp(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                              cfg.norm_topk_prob, cfg.hidden_act, dtype)
