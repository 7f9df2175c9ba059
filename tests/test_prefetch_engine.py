"""Runtime prefetch from the previous step's routing (``offload_prefetch="previous_step"``) in a real engine.

The tiny random Qwen3-MoE (2 MoE layers x 8 experts, top-2) on a CPU worker with two plain-process expert
hosts, 4 experts resident, a spare ring; the cost model is set to never fetch on demand, so every slot fill
is a prefetch. Against the same engine without prefetch, every step's logits (prefill and decode) are
bit-identical (``torch.equal``: a slot computes with the host's kernels on the same rows, summed in the same
order), and the bookkeeping adds up exactly: the rows the prefetching engine computed in slots are the rows
the other one sent to hosts and it did not (remote_off == remote_on + spare_on), prefetches were issued and
used, and issued >= used + wasted. A ring of 1 slot for 12 cold experts must waste some prefetches.
The engine's counters reach /metrics the way a replica pushes them (``expert_metrics()`` -> WorkerMetrics
-> MetricsBoard -> ``render_prometheus``): ``tierserve:expert_prefetches_{issued,used,wasted}_total`` of
two such replicas are exactly twice the ring's counts.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model_harness import MOE_PROMPT, greedy_run, save_tiny_moe
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.errors import InvalidParameterError
from tierserve.offload.spare_slots import CostModel
from tierserve.server.metrics import MetricsBoard, WorkerMetrics, render_prometheus

PROMPTS = [MOE_PROMPT, [(5 * i + 2) % 380 + 1 for i in range(30)], [9, 8, 7]]
NEVER_FETCH = CostModel(rtt_s=1e-6, remote_token_s=1e-9, bandwidth_Bps=1.0)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> str:
    return save_tiny_moe(str(tmp_path_factory.mktemp("tiny_moe_prefetch")), seed=23)


def _counters(eng: LLMEngine) -> dict:
    blocks, spare = eng.offload.blocks, eng.offload.spare
    return dict(remote=sum(b.counters.remote_rows for b in blocks), spare=sum(b.counters.spare_rows for b in blocks),
                fills=spare.fills, hits=spare.hits, issued=spare.prefetch.issued, used=spare.prefetch.used,
                wasted=spare.prefetch.wasted)


def test_prefetch_is_bit_identical_and_counts_exactly(tiny_moe):
    """One engine, the same requests run twice (no prefix cache: the same schedule): prefetch off, then on."""
    offload = OffloadConfig(resident_experts=4, expert_hosts=2, timeout_s=20.0, spare_slots=2,
                            promotion_max_swaps=0)
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=tiny_moe, dtype="float32"), device="cpu", offload=offload,
                                 cache=CacheConfig(num_blocks=64, block_size=16, enable_prefix_caching=False),
                                 scheduler=SchedulerConfig(max_num_seqs=4)))
    try:
        assert eng.offload.prefetch == "none"
        for block in eng.offload.blocks:
            block.cost = NEVER_FETCH
        ref_tokens, ref_logits = greedy_run(eng, PROMPTS, 10)
        off = _counters(eng)
        assert off["spare"] == off["fills"] == off["issued"] == 0  # no prefetch, no demand fetch
        eng.offload.prefetch = "previous_step"
        tokens, logits = greedy_run(eng, PROMPTS, 10)
        on = {k: v - off[k] for k, v in _counters(eng).items()}
        exported = _exported_prefetches(eng.expert_metrics())
    finally:
        eng.close()
    assert len(logits) == len(ref_logits) == 10
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.equal(a, b), f"step {step}"
    assert tokens == ref_tokens
    assert on["issued"] > 0 and on["used"] > 0 and on["spare"] > 0
    assert on["remote"] + on["spare"] == off["remote"]  # every row ran once: on a host or in a slot
    assert on["issued"] >= on["used"] + on["wasted"] and on["fills"] <= on["issued"]
    # /metrics of two such replicas (the worker's push path, summed by the board): exactly twice the ring's counts
    assert exported == {o: 2.0 * (off[o] + on[o]) for o in ("issued", "used", "wasted")}
    assert exported["issued"] > 0 and exported["used"] + exported["wasted"] <= exported["issued"]
    print(f"prefetch on, 2 slots: {on}; off: {off}")


def _exported_prefetches(metrics) -> dict[str, float]:
    """The spare-slot prefetch counters on /metrics when two replicas push ``metrics`` (outcome -> value)."""
    board = MetricsBoard()
    for replica in ("r1", "r2"):
        board.push(replica, WorkerMetrics("m").take(0, 0, 0.0, 0, 0, experts=metrics))
    text = render_prometheus(list(board.collect().values())).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name = sample.name.removeprefix("tierserve:expert_prefetches_").removesuffix("_total")
            if sample.name.startswith("tierserve:expert_prefetches_") and sample.name.endswith("_total"):
                assert sample.labels == {"model_name": "m"}
                out[name] = sample.value
    return out


def test_prefetch_needs_spare_slots():
    with pytest.raises(InvalidParameterError, match="offload_prefetch"):
        OffloadConfig(resident_experts=4, prefetch="previous_step")
    with pytest.raises(InvalidParameterError, match="offload_prefetch"):
        OffloadConfig(resident_experts=4, spare_slots=2, prefetch="lru")
