"""Plain decode steps through the preallocated buffers (engine/step_inputs.py): the views hold exactly the
step's rows after every batch change (brute force from a list copy of the block table), and an engine whose
runner takes that path produces logits bit-identical to one that flattens every step."""

from __future__ import annotations

import pytest
import torch

from model_harness import save_tiny_llama
from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.engine.step_inputs import DecodeBuffers
from tierserve.sampling_params import SamplingParams

BS = 4


def _expected(table: list[list[int]], rows, slot_pos, width):
    slots = [table[r][p // BS] * BS + p % BS for r, p in zip(rows, slot_pos)]
    return slots, [table[r][:width] for r in rows]


def test_buffers_hold_exactly_each_steps_rows():
    gen = torch.Generator().manual_seed(0)
    host = torch.randint(0, 1000, (6, 8), generator=gen, dtype=torch.long)
    buf = DecodeBuffers(6, host, BS)
    steps = [([3, 1], [9, 30], [7, 30], 8), ([5], [2], [2], 1), ([0, 4, 2, 5], [1, 2, 3, 4], [12, 0, 5, 31], 8),
             ([4, 0], [5, 6], [13, 1], 4), ([4, 0], [7, 8], [14, 2], 4)]
    for i, (rows, tokens, slot_pos, width) in enumerate(steps):
        if i == 4:  # a row rewritten between steps (eviction, rollback): the next step reads the new blocks
            host[4] = torch.arange(100, 108)
        positions = [p + 3 for p in slot_pos]
        ids, pos, slots, table = buf.load(tokens, positions, slot_pos, rows, width)
        want_slots, want_table = _expected(host.tolist(), rows, slot_pos, width)
        assert ids.tolist() == tokens and pos.tolist() == positions
        assert slots.tolist() == want_slots
        assert table.tolist() == want_table and table.shape == (len(rows), width) and table.is_contiguous()
    with pytest.raises(ValueError, match="1..6"):
        buf.load([1] * 7, [0] * 7, [0] * 7, list(range(7)), 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_decode_buffers")))


def _run(path: str, buffers: bool) -> tuple[list, int]:
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=path), cache=CacheConfig(num_blocks=64, block_size=BS),
                                 scheduler=SchedulerConfig(max_num_seqs=4)))
    runner = eng.runner
    if not buffers:
        runner.decode_buffers = None
    steps, plain = [], [0]
    execute, run_decode = runner.execute, runner._run_decode

    def record(sched, requests):
        out = execute(sched, requests)
        steps.append((list(out.request_ids), None if out.logits is None else out.logits.clone()))
        return out

    def count(sched, requests):
        plain[0] += 1
        return run_decode(sched, requests)

    runner.execute, runner._run_decode = record, count
    for i, n in enumerate((5, 9, 3)):  # different lengths: the batch shrinks as each finishes
        eng.add_request(list(range(10 + i, 10 + i + 3 + 4 * i)), SamplingParams(max_tokens=n, temperature=0.0,
                                                                                 ignore_eos=True))
    for k in range(40):
        if k == 4:  # a request joining mid-way: a prefill step, then a larger decode batch
            eng.add_request([7, 8, 9, 10, 11], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        if not eng.has_unfinished():
            break
        eng.step()
    return steps, plain[0]


def test_buffered_decode_equals_flattened_steps_bit_for_bit(tiny):
    fast, n_fast = _run(tiny, True)
    ref, n_ref = _run(tiny, False)
    assert n_ref == 0 and n_fast >= 6  # the path under test ran on most steps
    assert [ids for ids, _ in fast] == [ids for ids, _ in ref]
    for (_, a), (_, b) in zip(fast, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
