"""Prefetch into spare slots on a CUDA worker (``cuda`` marker; benchmarks/device_check.sh runs it).

The tiny random Qwen3-MoE on the GPU in fp32, two plain-process hosts, 4 experts resident, a ring of 3 slots
and a cost model that never fetches on demand, so every fill is a prefetch copied on the ring's copy stream
and waited for by the consuming layer through its event. A slot computes on the GPU and a host on the CPU
(different kernels), so the check against prefetch off is not bitwise: greedy tokens equal prefetch off and
the all-resident engine, every step's logits within 1e-4 of prefetch off, prefetches were issued and used,
and every slot's weights on the device equal, byte for byte, the expert as the checkpoint stores it (a slot
is complete when it is read).
"""

from __future__ import annotations

import pytest
import torch

from model_harness import greedy_run
from test_prefetch_engine import NEVER_FETCH, PROMPTS, _counters, tiny_moe  # noqa: F401  (the module fixture)
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, OffloadConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.cuda


def _engine(folder: str, resident: int | None, slots: int = 0) -> LLMEngine:
    offload = OffloadConfig(resident_experts=resident, expert_hosts=2, timeout_s=20.0, spare_slots=slots,
                            promotion_max_swaps=0)
    return LLMEngine(EngineConfig(model=ModelConfig(model=folder, dtype="float32"), device="cuda", offload=offload,
                                  cache=CacheConfig(num_blocks=64, block_size=16, enable_prefix_caching=False),
                                  scheduler=SchedulerConfig(max_num_seqs=4)))


def test_cuda_prefetch_greedy_equal_and_slots_complete(tiny_moe):  # noqa: F811
    ref = _engine(tiny_moe, None)
    try:
        ref_tokens, _ = greedy_run(ref, PROMPTS, 10)
    finally:
        ref.close()
    eng = _engine(tiny_moe, 4, slots=3)
    try:
        for block in eng.offload.blocks:
            block.cost = NEVER_FETCH
        off_tokens, off_logits = greedy_run(eng, PROMPTS, 10)
        off = _counters(eng)
        eng.offload.prefetch = "previous_step"
        tokens, logits = greedy_run(eng, PROMPTS, 10)
        on = {k: v - off[k] for k, v in _counters(eng).items()}
        spare, source = eng.offload.spare, eng.offload.pool.source
        for key in spare.keys():
            module = spare._slots[key]
            w = source.read(*key)
            assert module.gate_up_proj.weight.is_cuda
            assert torch.equal(module.gate_up_proj.weight.cpu(), torch.from_numpy(w.gate_up))
            assert torch.equal(module.down_proj.weight.cpu(), torch.from_numpy(w.down))
    finally:
        eng.close()
    assert tokens == off_tokens == ref_tokens
    for step, (a, b) in enumerate(zip(logits, off_logits)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (step, float((a - b).abs().max()))
    assert on["issued"] > 0 and on["used"] > 0 and on["spare"] > 0
    assert on["remote"] + on["spare"] == off["remote"]
