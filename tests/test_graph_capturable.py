"""``graph_capturable`` (models/base.py) is exactly the modules' declaration, and the expert-offload block
declares itself not capturable.

Structure only (tiny random Qwen3-MoE and Llama configs, weights never run): the resident ``SparseMoeBlock``
and ``OffloadedMoeBlock`` declare ``graph_capturable = False`` in their own class; a module that merely
borrows ``SparseMoeBlock.route`` is capturable (routing code alone marks nothing). After replacing every MoE
block by an ``OffloadedMoeBlock`` (a real pool that holds every expert on the worker), the boundary layers
are still exactly the MoE layers [0, 1] and the model decodes with piecewise graphs, never full ones.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, Qwen3MoeConfig

from model_harness import TINY_QWEN3_MOE
from tierserve.engine.piecewise_graphs import boundary_layers, decode_graph_mode
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.base import graph_capturable
from tierserve.models.moe import SparseMoeBlock
from tierserve.models.registry import model_class
from tierserve.offload.dispatch import OffloadedMoeBlock
from tierserve.offload.host_pool import HostPool


def _structure(hf_config, arch: str):
    cfg = ModelArchConfig.from_hf({**hf_config.to_dict(), "architectures": [arch]})
    return model_class(cfg.architecture)(cfg)


def test_capturable_is_the_declaration():
    assert vars(SparseMoeBlock)["graph_capturable"] is False
    assert vars(OffloadedMoeBlock)["graph_capturable"] is False

    class Borrowing(nn.Module):
        route = SparseMoeBlock.route

    assert graph_capturable(Borrowing()) and graph_capturable(nn.Linear(2, 2))


def test_offloaded_blocks_are_the_boundaries():
    model = _structure(Qwen3MoeConfig(**TINY_QWEN3_MOE), "Qwen3MoeForCausalLM")
    assert boundary_layers(model) == [0, 1]
    pool = HostPool({}, {}, None, "torch", 1.0)
    for j, layer in enumerate(model.layers):
        block = layer.mlp
        layer.mlp = OffloadedMoeBlock(block, j, tuple(range(block.num_experts)), pool, expert_bytes=0)
        assert not graph_capturable(layer.mlp)
    assert not any(isinstance(m, SparseMoeBlock) for m in model.modules())
    assert boundary_layers(model) == [0, 1]
    assert decode_graph_mode(model) == "piecewise" and not model.supports_cuda_graphs()
    dense = _structure(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64), "LlamaForCausalLM")
    assert boundary_layers(dense) == [] and decode_graph_mode(dense) == "full"
