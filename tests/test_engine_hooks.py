"""The step-hook contract (tierserve/step/hooks.py) as the engine keeps it, on the real SmolLM2.

A hook that records its calls is appended to the engine's hooks; the tests assert the exact call
sequence for a normal finish, an abort and a preemption, and that a failing hook fails the step.
"""

from __future__ import annotations

import pytest

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.engine.llm_engine import LLMEngine
from tierserve.sampling_params import SamplingParams
from tierserve.step.hooks import StepHook


class Recorder(StepHook):
    def __init__(self):
        self.calls: list[tuple] = []

    def before_forward(self, sched, requests):
        self.calls.append(("before", tuple(s.request_id for s in sched.scheduled), sched.preempted))
        assert all(s.request_id in requests for s in sched.scheduled)

    def after_forward(self, sched, requests):
        self.calls.append(("after", tuple(s.request_id for s in sched.scheduled)))

    def on_finish(self, request):
        assert request.block_ids, "on_finish must run while the request still holds its blocks"
        self.calls.append(("finish", request.request_id))

    def on_release(self, request_id):
        self.calls.append(("release", request_id))

    def at_request_boundary(self):
        self.calls.append(("boundary",))

    def close(self):
        self.calls.append(("close",))


def _engine(folder, num_blocks=64, max_num_seqs=4) -> tuple[LLMEngine, Recorder]:
    eng = LLMEngine(EngineConfig(model=ModelConfig(model=folder), cache=CacheConfig(num_blocks=num_blocks),
                                 scheduler=SchedulerConfig(max_num_seqs=max_num_seqs)))
    rec = Recorder()
    eng.hooks.append(rec)
    return eng, rec


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_call_order_finish_and_abort(smollm_folder):
    eng, rec = _engine(smollm_folder)
    eng.add_request("The capital of France is", _greedy(2), request_id="a")
    eng.add_request("Once upon a time", _greedy(4), request_id="b")
    eng.step()  # both prefill and sample their first token
    eng.step()  # a samples its 2nd token and finishes
    assert rec.calls == [("before", ("a", "b"), ()), ("after", ("a", "b")),
                         ("before", ("a", "b"), ()), ("after", ("a", "b")),
                         ("finish", "a"), ("release", "a"), ("boundary",)]
    rec.calls.clear()
    assert eng.abort("b")
    assert rec.calls == [("release", "b")]  # an abort is no finish and no request boundary
    assert not eng.has_unfinished()
    eng.close()
    assert rec.calls[-1] == ("close",)


def test_preempted_request_is_not_released(smollm_folder):
    """A pool of 5 blocks of 16 tokens cannot hold two growing requests: the later one is preempted,
    recomputed, and finishes; hooks see the preemption in the schedule, and on_release only at the end."""
    eng, rec = _engine(smollm_folder, num_blocks=5)
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    eng.add_request(prompt, _greedy(40), request_id="a")
    eng.add_request(prompt + " must", _greedy(40), request_id="b")
    finished = []
    while eng.has_unfinished():
        finished += [o.request_id for o in eng.step() if o.finished]
    preempting = [c for c in rec.calls if c[0] == "before" and c[2]]
    assert preempting and all(c[2] == ("b",) for c in preempting)
    releases = [c for c in rec.calls if c[0] in ("finish", "release")]
    assert releases == [(kind, rid) for rid in finished for kind in ("finish", "release")]
    assert rec.calls.count(("boundary",)) == 2


def test_failing_hook_fails_the_step(smollm_folder):
    class Broken(StepHook):
        def after_forward(self, sched, requests):
            raise RuntimeError("hook failed")

    eng, _ = _engine(smollm_folder)
    eng.hooks.append(Broken())
    eng.add_request("Hello", _greedy(2), request_id="x")
    with pytest.raises(RuntimeError, match="hook failed"):
        eng.step()
