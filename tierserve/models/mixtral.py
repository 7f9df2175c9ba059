"""Mixtral: Llama attention with a sparse MoE block in every layer.

HF names the block ``block_sparse_moe`` (router ``gate``, experts ``w1`` = gate,
``w3`` = up, ``w2`` = down). Routing: softmax over all experts, top-k, then the
k weights are always renormalised to sum to 1 (see ``moe.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.layers import Slot
from tierserve.models.llama import DecoderLM
from tierserve.models.moe import SparseMoeBlock


class MixtralForCausalLM(DecoderLM):
    def make_mlp(self, cfg: ModelArchConfig, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                              True, cfg.hidden_act, dtype, expert_names=("w1", "w3", "w2"))

    def mlp_slots(self, layer_idx: int, mlp: nn.Module, prefix: str) -> dict[str, Slot]:
        return mlp.hf_slots(prefix + "block_sparse_moe.")
