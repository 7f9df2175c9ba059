"""The whole-step batch-1 decode graph (models/decode_graph.py) against the eager forward, the reference.

A tiny random Llama (Q4_1 weights on the integer-dot kernel, the packed default's path) decodes one
sequence (fp32 and Q4_1 weights: two models, each with its own graph, in one process) through real
paged attention over a shuffled block table, across several block boundaries:
a 7-token prefill (the compiled segments), then decode steps (the graph), each fed the eager run's
greedy token. The logits of every step stay within ``BOUND`` of the eager ones relative to the step's
largest logit (``Q8_BOUND`` for Q4_1: its 8-bit activation codes), the greedy tokens are the same, the K/V pages written by the graph equal the eager
run's (the graph writes the runner's own page tensors in place), and every length ran on the graph
compiled once at warm-up (no recompilation). The graph skips dynamo's guards on the model's modules: a
weight changed in place is still read (the output doubles with the final norm's weight), and a step past
the RoPE table it was compiled against is not taken. Models and steps the graph does not take are left
to the segments.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils
from model_harness import PagedRunner, build_and_save
from transformers import LlamaConfig, MistralConfig

from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.cpu_fast import cpu_fast_module
from tierserve.models.context import ForwardContext
from tierserve.models.decode_compile import compile_decoder
from tierserve.models.decode_graph import DecodeGraph, eligible
from tierserve.models.loader import load_model

BOUND = 1e-5
# Q4_1 runs the integer-dot kernel (q8_dot_cpu.py), which rounds activations to 8-bit codes per block of 32:
# where inductor's fused ops differ from eager's by an ulp (bit-equal on an Intel AVX512 host, not on an AMD
# AVX512 one), a code can round the other way, one step of 1/127 of its block's largest activation; that gave
# 4.2e-3 of the largest logit there. A wrong kernel, layer or weight differs by O(1).
Q8_BOUND = 1.5e-2
PROMPT = [3, 17, 42, 99, 5, 250, 7]
STEPS = 12  # 7 + 12 tokens at block size 4: the context crosses four block boundaries
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=64)


def _to_q4_1(model: torch.nn.Module) -> None:
    fmt = get_format("q4_1")
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, cpu_fast_module(QuantizedLinear(fmt, fmt.quantize(child.weight.detach()),
                                                                      child.bias)))


def _run(model, tokens: list[int] | None):
    runner = PagedRunner(model, block_size=4, num_blocks=16, seed=3)
    logits = [runner.step(PROMPT)[-1]]
    chosen = []
    for i in range(STEPS):
        nxt = int(logits[-1].argmax()) if tokens is None else tokens[i]
        chosen.append(nxt)
        logits.append(runner.step([nxt])[0])
    return logits, chosen, runner.kv


@pytest.mark.parametrize("weights", ["fp32", "q4_1"])  # two models of different structure in one process
def test_graph_equals_eager_and_writes_the_pages(tmp_path, weights):
    build_and_save(LlamaConfig(**TINY), tmp_path)
    model = load_model(str(tmp_path)).model
    if weights == "q4_1":
        _to_q4_1(model)
    eager, tokens, eager_kv = _run(model, None)
    compiled = compile_decoder(model, block_size=4)
    graph = compiled.step_graph
    assert graph is not None and graph.compile_s > 0
    graphs_after_warm_up = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got, chosen, got_kv = _run(model, tokens)
    assert graph.steps == STEPS  # every decode step took the graph, the prefill did not
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_warm_up  # no recompilation
    assert chosen == tokens
    bound = Q8_BOUND if weights == "q4_1" else BOUND
    for a, b in zip(eager, got):
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() <= bound * scale, ((a - b).abs().max().item(), scale)
    for e, g in zip(eager_kv, got_kv):
        for x, y in ((e.k, g.k), (e.v, g.v)):
            assert (x - y).abs().max().item() <= bound * x.abs().max().item()
            assert y.abs().sum() > 0
    # the graph skips dynamo's guards on the model's modules but reads the weights on every call: a weight
    # changed in place is seen (the final norm's weight doubled: the output doubles, exactly)
    assert graph.rope_positions == model.rope.cos_table.shape[0]
    pages = [torch.randn(3, 4, 2, 16) for _ in range(2 * len(model.layers))]
    args = (torch.tensor([5]), torch.tensor([4]), torch.tensor([4]), torch.tensor([0, 1]), 5, pages)
    with torch.inference_mode():
        before = graph._call(*args).clone()
        model.norm.weight.mul_(2)
        after = graph._call(*args)
    assert torch.equal(after, 2 * before)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_warm_up


def test_steps_and_models_the_graph_does_not_take(tmp_path):
    build_and_save(MistralConfig(**TINY, sliding_window=8), tmp_path / "mistral")
    assert not eligible(load_model(str(tmp_path / "mistral")).model)
    build_and_save(LlamaConfig(**TINY), tmp_path / "llama")
    model = load_model(str(tmp_path / "llama")).model
    with pytest.raises(ValueError, match="sliding windows"):
        DecodeGraph(load_model(str(tmp_path / "mistral")).model)
    assert compile_decoder(model, warm_up=False, whole_step=False).step_graph is None
    kv = PagedRunner(model, block_size=4, num_blocks=8).kv
    one = AttentionMetadata.build([1], [5], [[0, 1]], 4)
    two = AttentionMetadata.build([1, 1], [5, 3], [[0, 1], [2, 3]], 4)
    prefill = AttentionMetadata.build([3], [3], [[0]], 4)
    graph = DecodeGraph(model)
    assert graph.takes(ForwardContext(one, kv))
    assert not graph.takes(ForwardContext(two, kv))
    assert not graph.takes(ForwardContext(prefill, kv))
    graph.rope_positions = 4  # compiled against a 4-position RoPE table: a 5-token sequence is past it
    assert not graph.takes(ForwardContext(one, kv))
    graph.rope_positions = 5
    assert graph.takes(ForwardContext(one, kv))
    one.tree_bits = [-1]
    assert not graph.takes(ForwardContext(one, kv))
