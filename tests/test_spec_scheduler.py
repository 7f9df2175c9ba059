"""Speculative decoding in the bookkeeping: the scheduler budgets 1 + drafts, the undo log rolls back exactly.

Plain ints throughout (no torch): exact block ids, computed-token counts and free counts.
"""

from __future__ import annotations

import pytest

from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.config import SchedulerConfig
from tierserve.engine.block_table import BlockTables
from tierserve.engine.request import Request, RequestStatus
from tierserve.engine.scheduler import Scheduler
from tierserve.errors import InvalidParameterError
from tierserve.sampling_params import SamplingParams


def setup(num_blocks=8, budget=64, caching=True):
    kv = KVCacheManager(num_blocks, 4, caching)
    return kv, Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget), kv)


def prefill(sched, rid="a", prompt=(1, 2, 3, 4, 5, 6), first_token=7, max_tokens=20):
    req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens))
    sched.add_request(req)
    out = sched.schedule()
    assert [(s.start, s.num_tokens, s.spec_token_ids) for s in out.scheduled] == [(0, len(prompt), ())]
    req.append_output(first_token)
    return req


def test_drafts_are_scheduled_and_rejected_ones_rolled_back():
    kv, sched = setup()
    req = prefill(sched)
    assert len(req.block_ids) == 2 and kv.num_free_blocks == 6
    req.spec_token_ids = [8, 9, 10, 11]
    out = sched.schedule()
    (sr,) = out.scheduled
    assert (sr.start, sr.num_tokens, sr.spec_token_ids, out.num_batched_tokens) == (6, 5, (8, 9, 10, 11), 5)
    assert req.num_computed_tokens == 11 and len(sr.new_block_ids) == 1 and len(req.block_ids) == 3
    req.append_output(8)   # draft 0 accepted
    req.append_output(42)  # draft 1 rejected: the correction
    freed = sched.rollback("a", req.num_tokens - 1)
    assert freed == list(sr.new_block_ids)  # 8 computed tokens fit the 2 blocks held before the step
    assert req.num_computed_tokens == 8 and len(req.block_ids) == 2 and kv.num_free_blocks == 6
    req.spec_token_ids = []
    (sr,) = sched.schedule().scheduled
    assert (sr.start, sr.num_tokens, sr.spec_token_ids) == (8, 1, ())
    with pytest.raises(KeyError):  # the undo log holds only requests verified this step
        sched.rollback("a", 9)


def test_all_accepted_keeps_every_block_and_the_log_refuses_bad_counts():
    _, sched = setup()
    req = prefill(sched)
    req.spec_token_ids = [8, 9]
    (sr,) = sched.schedule().scheduled
    assert sr.num_tokens == 3 and req.num_computed_tokens == 9
    with pytest.raises(InvalidParameterError, match="num_computed_tokens"):
        sched.rollback("a", 6)  # must keep more than the verified token's position
    sched._undo["a"] = (6, 2)  # the failed call consumed the entry; restore it for the real one
    for t in (8, 9, 3):
        req.append_output(t)
    assert sched.rollback("a", req.num_tokens - 1) == []
    assert req.num_computed_tokens == 9 and len(req.block_ids) == 3


def test_drafts_trimmed_to_the_budget():
    _, sched = setup(budget=3)
    req = prefill(sched, prompt=(1, 2, 3))
    req.spec_token_ids = [8, 9, 10, 11]
    (sr,) = sched.schedule().scheduled
    assert (sr.num_tokens, sr.spec_token_ids) == (3, (8, 9))


def test_drafts_never_preempt():
    kv, sched = setup(num_blocks=4)
    a = Request("a", [1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=8))  # 2 blocks of 4
    b = Request("b", [9, 9, 9, 9, 9], SamplingParams(max_tokens=8))     # the other 2
    sched.add_request(a)
    sched.add_request(b)
    assert [s.num_tokens for s in sched.schedule().scheduled] == [6, 5]
    a.append_output(7)
    b.append_output(5)
    assert kv.num_free_blocks == 0
    a.spec_token_ids = [1, 2, 3]  # would need a third block: scheduled without drafts, nobody preempted
    out = sched.schedule()
    assert out.preempted == ()
    assert [(s.request_id, s.num_tokens, s.spec_token_ids) for s in out.scheduled] == [("a", 1, ()), ("b", 1, ())]


def test_prefix_cached_blocks_survive_a_rollback():
    kv, sched = setup()
    req = prefill(sched, prompt=tuple(range(1, 9)), first_token=50)  # 8 tokens: two full, cached blocks
    full = list(req.block_ids)
    req.spec_token_ids = [60, 61, 62, 63]
    (sr,) = sched.schedule().scheduled
    assert req.num_computed_tokens == 13 and len(sr.new_block_ids) == 2
    req.append_output(77)  # draft 0 rejected: 9 tokens keep KV, in 3 blocks
    assert sched.rollback("a", req.num_tokens - 1) == [sr.new_block_ids[1]]
    assert req.block_ids == full + [sr.new_block_ids[0]] and req.num_computed_tokens == 9
    assert [kv.pool.block_hash(b) is not None for b in full] == [True, True]
    with pytest.raises(ValueError, match="prefix-cached"):
        kv.truncate(req, 4)


def test_block_table_truncate():
    t = BlockTables(2, 8)
    t.reset("a", [5, 6, 7])
    t.truncate("a", 1)
    t.append("a", [9])
    assert t.num_blocks("a") == 2 and t.host[t.row("a"), :2].tolist() == [5, 9]
    with pytest.raises(ValueError):
        t.truncate("a", 3)


def test_preempted_request_loses_its_drafts_and_resumes_plainly():
    _, sched = setup(num_blocks=5)
    a = Request("a", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=8))  # 2 blocks, a third at its 9th token
    b = Request("b", [9, 9, 9, 9, 9, 9, 9], SamplingParams(max_tokens=8))  # 2 blocks
    sched.add_request(a)
    sched.add_request(b)
    assert [s.num_tokens for s in sched.schedule().scheduled] == [7, 7]
    a.append_output(8)
    b.append_output(8)
    a.spec_token_ids, b.spec_token_ids = [5, 6], [5, 6]
    out = sched.schedule()  # a's drafts take the last free block; b's do not fit (no preemption for drafts)
    assert [(s.request_id, s.num_tokens, s.spec_token_ids) for s in out.scheduled] == [("a", 3, (5, 6)),
                                                                                       ("b", 1, ())]
    a.append_output(5)
    a.append_output(6)
    a.append_output(1)  # both drafts accepted plus the bonus: 11 tokens, 10 with KV
    assert sched.rollback("a", a.num_tokens - 1) == []
    b.append_output(3)
    a.spec_token_ids = [2, 2]
    out = sched.schedule()  # a's drafts need a 4th block: dropped; b's 9th token needs a 3rd: b preempts itself
    assert out.preempted == ("b",) and b.spec_token_ids == [] and b.num_computed_tokens == 0
    assert [(s.request_id, s.num_tokens, s.spec_token_ids) for s in out.scheduled] == [("a", 1, ())]
    a.append_output(4)
    sched.finish("a", RequestStatus.FINISHED_LENGTH)
    (sr,) = sched.schedule().scheduled  # b: two cached prompt blocks, then its last token, no drafts
    assert (sr.request_id, sr.start, sr.num_tokens, sr.spec_token_ids, sr.resumed) == ("b", 8, 1, (), True)
