"""Piecewise decode graphs on the CPU: the segment plan (exact, on tiny MoE configs) and the segmented forward.

- ``plan_segments``: exact segments for hand-written cuts, and bad input named.
- the plans of tiny random Mixtral / Qwen2-MoE (a dense layer between MoE layers) / OLMoE models: the
  boundaries are exactly the MoE layers, every named submodule exists, and segments + boundaries list the
  model's forward in order (every layer's four parts once, embedding first, final norm and head last).
- ``ModelRunner.install_decode_graphs`` names a bad ``mode`` and refuses uncaptured full graphs.
- ``decode_graph_mode``: "full" for a dense decoder, "piecewise" for a MoE one and for the same model after
  expert offload (whose blocks must not pass as capturable: they plan dispatch on the host).
- ``PiecewiseGraphs`` before capture (segments run eagerly around eager MoE blocks, padding rows on a scratch
  page) against the model's own forward on the same KV pages: logits bit-identical (``torch.equal``; within
  1e-5 of their scale on a host whose float32 linear sums in a row-count-dependent order, probed) at
  batches 1 (bucket 1), 2 (bucket 2) and 3 (bucket 4: one padding row), for the all-resident tiny Qwen3-MoE,
  a tiny Qwen2-MoE whose middle layer is dense (run whole inside a segment) with a shared expert, and the
  Qwen3-MoE with 10 of 16 experts on two socket expert-host processes; the offloaded blocks route exactly
  ``n * top_k`` rows per layer and step (padding rows never reach an expert).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from model_harness import TINY_QWEN3_MOE, build_and_save
from tierserve.engine.model_runner import ModelRunner, StepInputs
from tierserve.engine.piecewise_graphs import (PiecewiseGraphs, Segment, boundary_layers, decode_graph_mode,
                                               plan_segments)
from tierserve.errors import InvalidParameterError
from tierserve.kernels.paged_attention import AttentionMetadata
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.context import ForwardContext
from tierserve.models.loader import load_model
from tierserve.models.registry import model_class

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
TINY = {
    "mixtral": lambda: MixtralConfig(**{**COMMON, "num_hidden_layers": 2}, num_local_experts=4,
                                     num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=24, mlp_only_layers=[1]),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2),
    "llama": lambda: LlamaConfig(**COMMON),
}


ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
        "llama": "LlamaForCausalLM"}


def _build(name: str):
    """The model's structure only (weights uninitialised: the plan never runs it)."""
    cfg = ModelArchConfig.from_hf({**TINY[name]().to_dict(), "architectures": [ARCH[name]]})
    return model_class(cfg.architecture)(cfg)


def test_plan_segments_exact():
    assert plan_segments(4, [2, 0]) == [Segment(0, None, (), 0), Segment(1, 0, (1,), 2), Segment(2, 2, (3,), None)]
    assert plan_segments(2, [0, 1]) == [Segment(0, None, (), 0), Segment(1, 0, (), 1), Segment(2, 1, (), None)]
    assert plan_segments(3, []) == [Segment(0, None, (0, 1, 2), None)]
    seg = plan_segments(4, [2, 0])[1]
    assert seg.modules() == ["+layers.0.mlp", "layers.1", "layers.2.input_layernorm", "layers.2.self_attn",
                             "layers.2.post_attention_layernorm"]
    assert seg.boundary == "layers.2.mlp"
    assert plan_segments(4, [2])[-1].modules() == ["+layers.2.mlp", "layers.3", "norm", "logits_head"]
    assert plan_segments(4, [2])[-1].boundary is None
    with pytest.raises(InvalidParameterError, match="boundaries.*layer 3 is outside"):
        plan_segments(3, [3])
    with pytest.raises(InvalidParameterError, match="num_layers.*>= 1"):
        plan_segments(0, [])


@pytest.mark.parametrize("name,cuts", [("mixtral", [0, 1]), ("qwen2_moe", [0, 2]), ("olmoe", [0, 1, 2])])
def test_plans_of_tiny_moe_models(name, cuts):
    model = _build(name)
    assert boundary_layers(model) == cuts
    assert decode_graph_mode(model) == "piecewise" and not model.supports_cuda_graphs()
    plan = plan_segments(len(model.layers), boundary_layers(model))
    assert len(plan) == len(cuts) + 1
    flat = []
    for seg in plan:
        flat += [m.lstrip("+") for m in seg.modules()]
        if seg.boundary is not None:
            flat.append(seg.boundary)
    for m in flat:
        if m != "rope":
            model.get_submodule(m)  # raises for a name the model lacks
    # the forward in order: residual adds of a boundary come right after it; whole layers expand to four parts
    expanded = [p for m in flat for p in (
        [f"{m}.{part}" for part in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")]
        if m.count(".") == 1 and m.startswith("layers.") else [m])]
    deduped = [m for i, m in enumerate(expanded) if i == 0 or m != expanded[i - 1]]
    want = ["rope", "embed_tokens"] + [f"layers.{i}.{part}" for i in range(len(model.layers)) for part in
                                        ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")]
    assert deduped == want + ["norm", "logits_head"]


def test_dense_model_gets_full_graphs():
    model = _build("llama")
    assert boundary_layers(model) == [] and decode_graph_mode(model) == "full"
    with pytest.raises(InvalidParameterError, match="model.*no piecewise decode plan"):
        PiecewiseGraphs(model, [], None, 4, 4, 16, scratch_block=0, max_num_seqs=2, device=torch.device("cpu"))


def test_install_decode_graphs_rejects_bad_input():
    model = _build("llama")
    runner = ModelRunner(model, model.kv_spec(4), 9, 2, 16)
    with pytest.raises(InvalidParameterError, match="mode.*'full', 'piecewise'.*'partial'"):
        runner.install_decode_graphs("partial", 8, 2, 16)
    with pytest.raises(InvalidParameterError, match="capture.*only replay captured"):
        runner.install_decode_graphs("full", 8, 2, 16, capture=False)
    assert runner.graphs is None


# ------------------------------------------------------------------ segmented forward == model forward
BS, NUM_BLOCKS, MAX_SEQS, MAX_LEN = 4, 48, 4, 64
PROMPTS = [[3, 17, 42, 99, 5, 250, 7, 31, 64, 128, 11], [9, 8, 7, 6, 5], [200, 1, 300, 2, 40, 41, 42]]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_moe_piecewise"))
    build_and_save(Qwen3MoeConfig(**TINY_QWEN3_MOE), path, seed=29, noise=0.2)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory) -> str:
    """3 layers, the middle one dense (a segment that runs a whole layer), a shared expert in the MoE ones."""
    path = str(tmp_path_factory.mktemp("tiny_qwen2_moe_piecewise"))
    cfg = Qwen2MoeConfig(**{**TINY_QWEN3_MOE, "num_hidden_layers": 3}, shared_expert_intermediate_size=40,
                         mlp_only_layers=[1])
    build_and_save(cfg, path, seed=30, noise=0.2)
    return path


@pytest.fixture(scope="module")
def hosts():
    from tierserve.offload.launcher import HostSpec, ProcessHostLauncher

    launcher = ProcessHostLauncher()
    launcher.launch(2, HostSpec("auto"))
    yield launcher
    launcher.shutdown()


class Sequences:
    """Prompts prefilled with the model's own forward into shuffled KV pages (the last page is the scratch)."""

    def __init__(self, model):
        self.model = model
        self.runner = ModelRunner(model, model.kv_spec(BS), NUM_BLOCKS + 1, MAX_SEQS, MAX_LEN)
        pages = list(range(NUM_BLOCKS))
        random.Random(5).shuffle(pages)
        per = MAX_LEN // BS
        self.tokens = [list(p[:-1]) for p in PROMPTS]
        self.blocks = [pages[i * per:(i + 1) * per] for i in range(len(PROMPTS))]
        for i, b in enumerate(self.blocks):
            self.runner.block_tables.reset(f"s{i}", b)
        for i, p in enumerate(self.tokens):
            self.forward([i], [len(p)])
            p.append(PROMPTS[i][-1])  # its KV is written by the first decode step

    @torch.inference_mode()
    def forward(self, seqs: list[int], query_lens: list[int]) -> torch.Tensor:
        """The model's forward for the last ``query_lens`` tokens of ``seqs``: logits of each one's last token."""
        lens = [len(self.tokens[i]) for i in seqs]
        meta = AttentionMetadata.build(query_lens, lens, [self.blocks[i] for i in seqs], BS)
        ids = [t for i, q in zip(seqs, query_lens) for t in self.tokens[i][-q:]]
        pos = [p for n, q in zip(lens, query_lens) for p in range(n - q, n)]
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), ForwardContext(meta, self.runner.kv_caches))
        return self.model.compute_logits(hidden[torch.tensor(meta.query_start[1:]) - 1])

    def decode_step(self, seqs: list[int]) -> StepInputs:
        lens = [len(self.tokens[i]) for i in seqs]
        slots = torch.tensor([self.blocks[i][(n - 1) // BS] * BS + (n - 1) % BS for i, n in zip(seqs, lens)])
        return StepInputs([self.tokens[i][-1] for i in seqs], [n - 1 for n in lens], slots, seqs,
                          list(range(len(seqs) + 1)), lens, list(range(len(seqs))), [f"s{i}" for i in seqs])


def _linear_rows_invariant() -> bool:
    """Whether this host's float32 linear gives each row the same bits whatever the row count (the tiny
    models' shapes). True on an Intel AVX512 host's oneDNN kernels; false on AVX2 hosts and on an AMD AVX512
    host, whose kernels block by the row count, so a batch padded to its bucket sums in another order."""
    g = torch.Generator().manual_seed(0)
    for k, n in ((64, 64), (64, 384)):
        x, w = torch.randn(4, k, generator=g), torch.randn(n, k, generator=g)
        if not all(torch.equal(torch.nn.functional.linear(x[:m], w), torch.nn.functional.linear(x, w)[:m])
                   for m in (1, 2, 3)):
            return False
    return True


# bit-identical where the host's kernels do not depend on the row count (probed, not assumed from the ISA)
EXACT = _linear_rows_invariant()


def _check_segmented_equals_forward(model, segments: int) -> None:
    seqs = Sequences(model)
    seqs.runner.install_decode_graphs("piecewise", NUM_BLOCKS, MAX_SEQS, MAX_LEN, capture=False)
    graphs = seqs.runner.graphs
    assert graphs.buckets == [1, 2, 4] and len(graphs.plan) == segments
    for batch in ([0], [2, 1], [0, 1, 2], [1, 2, 0]):
        want = seqs.forward(batch, [1] * len(batch))
        got = graphs.run(seqs.decode_step(batch), seqs.runner.block_tables.table)
        assert got.shape == want.shape, batch
        if EXACT:
            assert torch.equal(got, want), batch
        else:  # the host's kernels block by the row count: the padded bucket sums in another order
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 1e-5 * scale, batch
        for i, row in zip(batch, want):
            seqs.tokens[i].append(int(row.argmax()))


def test_segmented_forward_is_bit_identical_resident(tiny_moe):
    _check_segmented_equals_forward(load_model(tiny_moe).model, 3)


def test_segmented_forward_is_bit_identical_with_a_dense_layer(tiny_qwen2_moe):
    model = load_model(tiny_qwen2_moe).model
    assert boundary_layers(model) == [0, 2]
    _check_segmented_equals_forward(model, 3)


def test_segmented_forward_is_bit_identical_offloaded(tiny_moe, hosts):
    from tierserve.offload.apply import apply_expert_offload
    from tierserve.offload.placement import plan_placement

    model = load_model(tiny_moe).model
    placement = plan_placement([[e % 3 for e in range(8)]] * 2, 6, 0)
    hook = apply_expert_offload(model, placement, hosts.transports(), model_path=tiny_moe, linear_backend="auto")
    try:
        assert decode_graph_mode(model) == "piecewise" and not model.supports_cuda_graphs()
        before = [sum(row) for row in hook.live.counts]
        routed = {b.layer: 0 for b in hook.blocks}
        _check_segmented_equals_forward(model, 3)
        # (token, slot) rows routed per layer: the prefills, then each of the 4 decode steps (1+2+3+3 real rows)
        # twice, by the reference forward and by the segmented one: padding rows are never routed
        k = TINY_QWEN3_MOE["num_experts_per_tok"]
        for layer, row in enumerate(hook.live.counts):
            routed[layer] = sum(row) - before[layer]
        assert routed == {j: k * (sum(len(p) - 1 for p in PROMPTS) + 2 * (1 + 2 + 3 + 3)) for j in routed}
        assert sum(hook.pool.stats.messages.values()) > 0 and not hook.pool.stats.failures
    finally:
        hook.close()
