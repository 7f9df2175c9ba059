"""Piecewise CUDA graphs for decode of a MoE model with offloaded experts (``cuda`` marker: skipped without a
GPU; run by benchmarks/device_check.sh). The CPU twin (segments run eagerly, bit-identical to the model's
forward) is tests/test_piecewise_graphs.py.

Model: the tiny random Qwen3-MoE of the offload tests (2 layers x 8 experts, top-2), 4 of 16 experts resident
on the GPU, 12 on two expert-host processes (socket). Three prompts decode together (every decode step at
batch 3: bucket 4, one padding row); two prompts cover bucket 2 (no padding).

- fp32, piecewise replay vs the same engine with ``enforce_eager``: greedy tokens equal, and every step's
  logits within a relative L2 error of 1e-4. Bound: the two paths run the same kernels except that the
  captured dense GEMMs see the bucket's row count (4) instead of the step's (3), which may pick a kernel with
  another summation order. Each fp32 GEMM of inner size K <= 96 (here: 64, 96, 48) then differs by at most
  K * 2^-24 ~ 5.7e-6 relative; a decode step chains ~10 of them (per layer q/k/v/o, the router and two per
  expert, plus the head), so 10 * 5.7e-6 = 5.7e-5, rounded up to 1e-4. (TF32 stays off: torch's default for
  matmuls.) The MoE blocks run eagerly on exactly the real rows, so the expert batches equal eager's.
- the expert usage both engines recorded is identical: padding rows are never routed, and warm-up and capture
  run no MoE block.
- bf16: the first decode step's logits (identical inputs) within the bf16 bound of tests/test_engine_cuda.py,
  8 * 2^-8 * sqrt(layers) (bf16 unit roundoff 2^-9, x2 for weights and activations, residual growth
  sqrt(layers), x4 for norms and softmax).
"""

from __future__ import annotations

import math

import pytest
import torch

from model_harness import MOE_PROMPT, TINY_QWEN3_MOE, greedy_run, save_tiny_moe
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.engine.piecewise_graphs import PiecewiseGraphs

pytestmark = pytest.mark.cuda
PROMPTS = [MOE_PROMPT, [(5 * i + 2) % 380 + 1 for i in range(30)], [9, 8, 7]]
FP32_REL = 1e-4  # module doc


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    return save_tiny_moe(str(tmp_path_factory.mktemp("tiny_moe_piecewise_cuda")), seed=31)


def _engine(folder: str, dtype: str, eager: bool, resident: int | None = 4) -> LLMEngine:
    offload = OffloadConfig(resident_experts=resident, expert_hosts=2, timeout_s=20.0)
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype=dtype, enforce_eager=eager), device="cuda",
                                  offload=offload if resident is not None else OffloadConfig(),
                                  cache=CacheConfig(num_blocks=64, block_size=16),
                                  scheduler=SchedulerConfig(max_num_seqs=4)))


def _run(eng: LLMEngine, prompts, new_tokens: int = 12):
    """(greedy tokens per prompt, the logits of every decode-only step in order, graph replays)."""
    replays = [0]
    graphs = eng.runner.graphs
    if graphs is not None:
        run = PiecewiseGraphs.run.__get__(graphs)  # the class's: a reused engine's counter is not stacked

        def counted(step, table):
            replays[0] += 1
            return run(step, table)

        graphs.run = counted
    tokens, steps = greedy_run(eng, prompts, new_tokens, decode_only=True)
    return tokens, steps, replays[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp32_offloaded(tiny_moe):
    """(eager engine, piecewise-graph engine), fp32, 4 of 16 experts resident; reused by both batch sizes."""
    eager, graphs = _engine(tiny_moe, "float32", True), _engine(tiny_moe, "float32", False)
    yield eager, graphs
    graphs.close()
    eager.close()


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:2]], ids=["batch3", "batch2"])
def test_fp32_piecewise_replay_equals_eager_with_offload(fp32_offloaded, prompts):
    eager, graphs = fp32_offloaded
    assert eager.runner.graphs is None
    pw = graphs.runner.graphs
    assert isinstance(pw, PiecewiseGraphs) and pw.captured and len(pw.plan) == 3
    tok_e, steps_e, _ = _run(eager, prompts)
    tok_g, steps_g, replays = _run(graphs, prompts)
    assert tok_g == tok_e
    assert replays == len(steps_g) > 0 and len(steps_g) == len(steps_e)
    worst = max(_rel(g, e) for g, e in zip(steps_g, steps_e))
    assert worst <= FP32_REL, worst
    assert graphs.offload.live.counts == eager.offload.live.counts  # padding rows never routed
    assert sum(graphs.offload.pool.stats.messages.values()) > 0 and not graphs.offload.pool.stats.failures


def test_resident_moe_decodes_with_piecewise_graphs(tiny_moe):
    eager, graphs = _engine(tiny_moe, "float32", True, None), _engine(tiny_moe, "float32", False, None)
    try:
        assert isinstance(graphs.runner.graphs, PiecewiseGraphs)
        tok_e, steps_e, _ = _run(eager, PROMPTS)
        tok_g, steps_g, replays = _run(graphs, PROMPTS)
        assert tok_g == tok_e and replays > 0
        assert max(_rel(g, e) for g, e in zip(steps_g, steps_e)) <= FP32_REL
    finally:
        graphs.close()
        eager.close()


def test_bf16_first_decode_step_within_bf16_bound(tiny_moe):
    eager, graphs = _engine(tiny_moe, "bfloat16", True), _engine(tiny_moe, "bfloat16", False)
    try:
        _, steps_e, _ = _run(eager, PROMPTS, new_tokens=2)
        _, steps_g, replays = _run(graphs, PROMPTS, new_tokens=2)
        assert replays >= 1
        rel = _rel(steps_g[0], steps_e[0])
        assert rel <= 8 * 2 ** -8 * math.sqrt(TINY_QWEN3_MOE["num_hidden_layers"]), rel
    finally:
        graphs.close()
        eager.close()
