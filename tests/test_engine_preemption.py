"""Preemption by recompute on the real SmolLM2: outputs under page pressure equal an unpressured run.

Four greedy requests of at most 16 prompt tokens and 20 new tokens need 2-3 blocks of 16 tokens each at
the end (at least 8 together); an engine with 6 blocks cannot hold them all, so the scheduler preempts the latest
running request (its blocks freed, its tokens recomputed when it is readmitted; tierserve/engine/
scheduler.py). The reference is the session engine with 512 blocks, where nothing is preempted. The
preemptions are counted by a step hook reading each step's ``SchedulerOutput.preempted``; the token ids
of every request must be identical, and every page free at the end.
"""

from __future__ import annotations

from tierserve import LLM, SamplingParams
from tierserve.step.hooks import StepHook

PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are",
           "def fibonacci(n):", "The history of the world is long and"]
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


class _PreemptionCounter(StepHook):
    def __init__(self):
        self.preempted: list[str] = []

    def before_forward(self, sched, requests) -> None:
        self.preempted.extend(sched.preempted)


def test_preemption_under_page_pressure_equals_unpressured_run(smollm_folder, smollm_llm):
    want = smollm_llm.generate(PROMPTS, PARAMS)
    assert all(len(o.prompt_token_ids) <= 16 for o in want)
    llm = LLM(smollm_folder, num_blocks=6, max_num_seqs=4)
    counter = _PreemptionCounter()
    llm.engine.hooks.append(counter)
    got = llm.generate(PROMPTS, PARAMS)
    print(f"preemptions: {len(counter.preempted)}")
    assert len(counter.preempted) > 0  # the pressure is real
    assert [list(o.token_ids) for o in got] == [list(o.token_ids) for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    engine = llm.engine
    assert not engine.has_unfinished() and engine.kv_manager.num_free_blocks == engine.num_blocks
    llm.engine.hooks.remove(counter)
