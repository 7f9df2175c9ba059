"""Scheduler: chunked prefill, mixed batches, strict FCFS, preemption by recompute, abort.

A small simulated engine drives it: after each step it writes the scheduled
tokens into a slot map through the runner's block table (rebuilt only from
ScheduledRequest deltas), re-reads each request's whole context through that
table, appends a deterministic sampled token to requests that reached their
end and finishes them at max_tokens. After every step the pool's ref counts
are recomputed independently from the block tables of running requests.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tierserve.cache.kv_cache_manager import KVCacheManager
from tierserve.cache.prefix_hash import hash_block
from tierserve.config import SchedulerConfig
from tierserve.engine.request import Request, RequestStatus
from tierserve.engine.scheduler import Scheduler
from tierserve.errors import InvalidParameterError
from tierserve.sampling_params import SamplingParams


def fake_token(r: Request) -> int:
    return (sum(r.prompt_token_ids) + 31 * len(r.output_token_ids)) % 997


def make_req(rid, tokens, max_tokens=16):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens))


def brief(out):
    return [(s.request_id, s.start, s.num_tokens, s.new_block_ids, s.resumed) for s in out.scheduled]


class SimEngine:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.bs = sched.kv.block_size
        self.tables: dict[str, list[int]] = {}
        self.slots: dict[tuple[int, int], int] = {}
        self.finished: list[str] = []

    def step(self):
        sched = self.sched
        out = sched.schedule()
        assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        for rid in out.preempted:
            self.tables.pop(rid, None)
        for s in out.scheduled:
            r = sched.get(s.request_id)
            base = [] if s.resumed else self.tables[s.request_id]
            table = base + list(s.new_block_ids)
            self.tables[s.request_id] = table
            assert table == r.block_ids
            tokens = r.token_ids()
            for pos in range(s.start, s.start + s.num_tokens):
                self.slots[(table[pos // self.bs], pos % self.bs)] = tokens[pos]
        for s in out.scheduled:  # every context (cached prefix included) reads back correctly
            table, r = self.tables[s.request_id], sched.get(s.request_id)
            end = s.start + s.num_tokens
            assert [self.slots[(table[p // self.bs], p % self.bs)] for p in range(end)] == r.token_ids(0, end)
        for s in out.scheduled:
            r = sched.get(s.request_id)
            if s.start + s.num_tokens == r.num_tokens:
                r.append_output(fake_token(r))
                if len(r.output_token_ids) >= r.params.max_tokens:
                    sched.finish(r.request_id, RequestStatus.FINISHED_LENGTH)
                    self.tables.pop(r.request_id)
                    self.finished.append(r.request_id)
        check_invariants(sched)
        return out

    def run(self, max_steps=1000):
        outs = []
        while self.sched.has_unfinished():
            outs.append(self.step())
            assert len(outs) < max_steps
        return outs


def check_invariants(sched: Scheduler):
    kv, bs = sched.kv, sched.kv.block_size
    refs = Counter(b for r in sched.running for b in r.block_ids)
    assert [kv.pool.ref_count(b) for b in range(kv.num_blocks)] == [refs[b] for b in range(kv.num_blocks)]
    assert kv.num_free_blocks == kv.num_blocks - len(refs)
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert len(r.block_ids) == -(-r.num_computed_tokens // bs)
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_ids == [] and r.num_computed_tokens == 0


def make_sched(num_blocks, block_size=4, budget=64, max_seqs=8, threshold=0, **kw):
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          long_prefill_token_threshold=threshold)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, **kw))


def test_chunked_prefill_under_budget_then_decode():
    sched = make_sched(num_blocks=16, budget=8)
    sched.add_request(make_req("a", range(20), max_tokens=3))
    eng = SimEngine(sched)
    assert brief(eng.step()) == [("a", 0, 8, (0, 1), True)]
    assert brief(eng.step()) == [("a", 8, 8, (2, 3), False)]
    out = eng.step()
    assert brief(out) == [("a", 16, 4, (4,), False)]
    r = sched.get("a")
    assert r.output_token_ids == [fake_token(make_req("x", range(20)))]   # sampled only now
    assert brief(eng.step()) == [("a", 20, 1, (5,), False)]
    assert brief(eng.step()) == [("a", 21, 1, (), False)]
    assert eng.finished == ["a"] and not sched.has_unfinished()
    assert sched.kv.num_free_blocks == 16 and r.status is RequestStatus.FINISHED_LENGTH



def test_pending_prefill_tokens_count_prompt_left_of_waiting_and_running():
    # The router's queued-prefill load (routing/policy.py CostAwarePolicy): prompt tokens without KV yet.
    sched = make_sched(num_blocks=16, budget=8)
    sched.add_request(make_req("a", range(20), max_tokens=3))
    sched.add_request(make_req("b", range(100, 106), max_tokens=3))
    assert sched.num_pending_prefill_tokens() == 26
    eng = SimEngine(sched)
    eng.step()                                   # a: 8 of 20 prompt tokens computed, b waits (budget 8)
    assert sched.num_pending_prefill_tokens() == 12 + 6
    eng.step()
    eng.step()                                   # a: its last 4 prompt tokens; b admitted with the other 4
    assert sched.get("b").num_computed_tokens == 4
    assert sched.num_pending_prefill_tokens() == 2
    eng.step()                                   # a decodes, b's last 2 prompt tokens
    assert sched.num_pending_prefill_tokens() == 0


def test_decode_and_prefill_mixed_in_one_step():
    sched = make_sched(num_blocks=16, budget=8)
    sched.add_request(make_req("a", range(5), max_tokens=4))
    sched.add_request(make_req("b", range(100, 110), max_tokens=2))
    eng = SimEngine(sched)
    out = eng.step()
    assert brief(out) == [("a", 0, 5, (0, 1), True), ("b", 0, 3, (2,), True)]
    assert out.num_batched_tokens == 8
    out = eng.step()   # a decodes its sampled token; b gets the rest of the budget
    assert brief(out) == [("a", 5, 1, (), False), ("b", 3, 7, (3, 4), False)]
    assert brief(eng.step()) == [("a", 6, 1, (), False), ("b", 10, 1, (), False)]
    assert eng.finished == ["b"]
    assert brief(eng.step()) == [("a", 7, 1, (), False)]
    assert eng.finished == ["b", "a"]


def test_long_prefill_threshold_lets_decodes_through():
    sched = make_sched(num_blocks=32, budget=16, threshold=6)
    sched.add_request(make_req("a", range(3), max_tokens=5))
    eng = SimEngine(sched)
    eng.step()
    sched.add_request(make_req("b", range(200, 220), max_tokens=1))
    assert brief(eng.step()) == [("a", 3, 1, (), False), ("b", 0, 6, (1, 2), True)]
    assert brief(eng.step()) == [("a", 4, 1, (3,), False), ("b", 6, 6, (4,), False)]


def test_fcfs_stops_at_first_request_that_does_not_fit():
    sched = make_sched(num_blocks=6)
    sched.add_request(make_req("a", range(12), max_tokens=2))   # 3 blocks
    sched.add_request(make_req("b", range(50, 67), max_tokens=2))  # 17 tokens: 5 blocks
    sched.add_request(make_req("c", range(90, 94), max_tokens=2))  # 1 block: would fit, must wait
    eng = SimEngine(sched)
    assert brief(eng.step()) == [("a", 0, 12, (0, 1, 2), True)]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.num_running() == 1 and sched.num_waiting() == 2
    eng.step()   # a decodes token 12 into a new block (3)
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    eng.run()
    assert eng.finished == ["a", "b", "c"]


def test_max_num_seqs_caps_admission():
    sched = make_sched(num_blocks=16, max_seqs=2)
    for rid in "abc":
        sched.add_request(make_req(rid, [ord(rid)] * 3, max_tokens=2))
    eng = SimEngine(sched)
    assert [s.request_id for s in eng.step().scheduled] == ["a", "b"]
    assert [s.request_id for s in eng.step().scheduled] == ["a", "b"]
    assert [s.request_id for s in eng.step().scheduled] == ["c"]


def test_preemption_by_recompute_latest_request_first():
    sched = make_sched(num_blocks=6)
    sched.add_request(make_req("a", range(4), max_tokens=3))           # 1 block
    sched.add_request(make_req("b", range(10, 17), max_tokens=4))      # 2 blocks
    sched.add_request(make_req("c", range(20, 31), max_tokens=3))      # 3 blocks
    sched.add_request(make_req("d", range(40, 44), max_tokens=1))      # no room left
    eng = SimEngine(sched)
    kv = sched.kv
    assert brief(eng.step()) == [("a", 0, 4, (0,), True), ("b", 0, 7, (1, 2), True),
                                 ("c", 0, 11, (3, 4, 5), True)]
    assert kv.num_free_blocks == 0
    c = sched.get("c")
    c_hashes = kv.block_hashes(c)

    # a needs a fifth slot -> a new block; none free -> c (latest admitted) is preempted
    out = eng.step()
    assert out.preempted == ("c",)
    assert brief(out) == [("a", 4, 1, (5,), False), ("b", 7, 1, (), False)]
    assert c.status is RequestStatus.PREEMPTED and c.num_preemptions == 1
    assert c.num_computed_tokens == 0 and c.block_ids == [] and len(c.output_token_ids) == 1
    assert [r.request_id for r in sched.waiting] == ["c", "d"]   # resumed first
    # freed tail first: 5 (partial, reused by a at once), then 4, then 3
    assert kv.pool.free_queue() == [4, 3]
    assert kv.pool.lookup(c_hashes[0]) == 3 and kv.pool.lookup(c_hashes[1]) == 4

    # b needs a block: takes 4 (c's second block: evicted before c's first)
    out = eng.step()
    assert out.preempted == ()
    assert brief(out) == [("a", 5, 1, (), False), ("b", 8, 1, (4,), False)]
    assert kv.pool.num_evictions == 1 and kv.pool.lookup(c_hashes[1]) is None
    assert kv.pool.lookup(c_hashes[0]) == 3
    # c (12 tokens) would hit block 3 and need 2 more; only block 3 itself is free -> waits,
    # and d behind it is not admitted either
    assert eng.finished == ["a"] and [r.request_id for r in sched.waiting] == ["c", "d"]
    assert kv.pool.free_queue() == [3, 5, 0]       # a freed its blocks in reverse order

    # c resumes: prefix hit on block 3, recomputes the rest of prompt + its generated token
    out = eng.step()
    assert brief(out) == [("b", 9, 1, (), False), ("c", 4, 8, (3, 5, 0), True)]
    assert c.num_cached_tokens == 0          # set at first admission only
    assert kv.pool.num_evictions == 2        # a's cached block 0 reused
    assert kv.stats.hit_tokens == 4 * 2      # the two lookups of c that hit block 3
    eng.run()
    assert eng.finished == ["a", "b", "c", "d"]
    # c's output continues exactly where it was before preemption
    expected = make_req("ref", range(20, 31))
    for _ in range(3):
        expected.append_output(fake_token(expected))
    assert c.output_token_ids == expected.output_token_ids
    assert kv.num_free_blocks == 6


def test_request_preempts_itself_when_it_is_the_latest():
    sched = make_sched(num_blocks=4)
    sched.add_request(make_req("a", range(7), max_tokens=9))      # grows to 15 computed: 4 blocks
    sched.add_request(make_req("b", range(30, 38), max_tokens=2))
    eng = SimEngine(sched)
    kv = sched.kv
    assert brief(eng.step()) == [("a", 0, 7, (0, 1), True), ("b", 0, 8, (2, 3), True)]
    out = eng.step()   # b (latest) needs a third block: it is its own victim
    assert out.preempted == ("b",) and brief(out) == [("a", 7, 1, (), False)]
    assert kv.pool.free_queue() == [3, 2]
    out = eng.step()   # a takes block 3 (b's second block, evicted); b's hit on block 2 is
    assert out.preempted == () and brief(out) == [("a", 8, 1, (3,), False)]  # not enough
    assert kv.pool.num_evictions == 1 and sched.num_waiting() == 1
    outs = eng.run()
    assert eng.finished == ["a", "b"]
    assert all(o.preempted == () for o in outs)
    resumed = [s for o in outs for s in o.scheduled if s.request_id == "b" and s.resumed]
    assert len(resumed) == 1   # recomputes prompt + its generated token in one chunk
    assert resumed[0].start + resumed[0].num_tokens == 9 and resumed[0].start % 4 == 0
    assert kv.num_free_blocks == 4


def test_abort_frees_blocks_everywhere():
    sched = make_sched(num_blocks=8)
    sched.add_request(make_req("a", range(9)))
    sched.add_request(make_req("b", range(50, 70), max_tokens=4))
    sched.add_request(make_req("c", range(90, 93)))
    eng = SimEngine(sched)
    eng.step()                     # a: 3 blocks, b: 5 blocks; c waits
    a = sched.get("a")
    assert a.block_ids == [0, 1, 2] and sched.num_waiting() == 1
    sched.abort("a")
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert sched.num_running() == 1 and sched.kv.num_free_blocks == 3
    assert sched.kv.pool.free_queue() == [2, 1, 0]
    c = sched.get("c")
    sched.abort("c")
    assert c.status is RequestStatus.FINISHED_ABORTED and sched.num_waiting() == 0
    sched.abort("c")               # unknown now: ignored
    with pytest.raises(KeyError):
        sched.get("a")
    check_invariants(sched)
    eng.run()
    assert eng.finished == ["b"] and sched.kv.num_free_blocks == 8


def test_prefix_cache_shared_between_requests():
    sched = make_sched(num_blocks=16)
    system = list(range(300, 312))
    sched.add_request(make_req("a", system + [1, 2], max_tokens=2))
    eng = SimEngine(sched)
    eng.step()
    sched.add_request(make_req("b", system + [7], max_tokens=2))
    out = eng.step()
    assert brief(out) == [("a", 14, 1, (), False), ("b", 12, 1, (0, 1, 2, 4), True)]
    assert sched.get("b").num_cached_tokens == 12
    eng.run()
    assert eng.finished == ["a", "b"]


class CountingHash:
    def __init__(self):
        self.calls = 0
        self.tokens = 0

    def __call__(self, parent, token_ids, extra=()):
        self.calls += 1
        self.tokens += len(token_ids)
        return hash_block(parent, token_ids, extra)


@pytest.mark.parametrize("prompt_len", [40, 3000])
def test_per_step_hashing_is_independent_of_context_length(prompt_len):
    counter = CountingHash()
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=512),
                      KVCacheManager(400, 16, hash_fn=counter))
    sched.add_request(make_req("a", [(i * 13) % 500 for i in range(prompt_len)], max_tokens=40))
    eng = SimEngine(sched)
    r = sched.get("a")
    while r.num_computed_tokens < prompt_len:
        eng.step()
    assert counter.calls == prompt_len // 16      # each full block hashed exactly once
    for _ in range(38):
        before_calls, before_tokens, before_full = counter.calls, counter.tokens, r.num_computed_tokens // 16
        out = eng.step()
        assert out.scheduled[0].num_tokens == 1
        filled = r.num_computed_tokens // 16 - before_full
        assert counter.calls - before_calls == filled
        assert counter.tokens - before_tokens == 16 * filled


def test_add_request_validation():
    sched = make_sched(num_blocks=4)
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(make_req("a", range(10), max_tokens=8))   # 17 tokens > 16 slots
    assert e.value.field == "max_tokens" and "4 KV blocks" not in str(e.value) and "5 KV blocks" in str(e.value)
    sched.add_request(make_req("a", range(10), max_tokens=7))       # 16 tokens: fits
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(make_req("a", range(3)))
    assert e.value.field == "request_id"
    with pytest.raises(InvalidParameterError) as e:
        sched.add_request(make_req("z", []))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidParameterError):
        sched.finish("a", RequestStatus.RUNNING)


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_completes_with_correct_kv_under_pressure(caching):
    """Seeded mix of shared-prefix prompts on a tight pool: every context reads back intact
    (SimEngine), ref counts match the tables every step, every request finishes with the
    outputs it would get alone, and the pool ends empty."""
    import random
    rng = random.Random(7)
    sched = make_sched(num_blocks=24, budget=24, max_seqs=6, threshold=10, enable_caching=caching)
    eng = SimEngine(sched)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    expected, preemptions = {}, 0
    for step in range(400):
        if step < 60 and rng.random() < 0.5:
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
            max_tokens = rng.randrange(1, 20)
            sched.add_request(make_req(rid, prompt, max_tokens=max_tokens))
            ref = make_req("ref", prompt)
            for _ in range(max_tokens):
                ref.append_output(fake_token(ref))
            expected[rid] = (sched.get(rid), ref.output_token_ids)
        if not sched.has_unfinished() and step >= 60:
            break
        preemptions += len(eng.step().preempted)
    assert not sched.has_unfinished()
    assert sorted(eng.finished) == sorted(expected)
    for rid, (r, outs) in expected.items():
        assert r.output_token_ids == outs, rid
    assert sched.kv.num_free_blocks == 24
    assert preemptions > 0                     # the pool really was under pressure
    if caching:
        assert sched.kv.stats.hit_tokens > 0
