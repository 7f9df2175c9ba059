"""Verification of one request's drafts on constructed logits: exact accepted prefix, correction, bonus."""

from __future__ import annotations

import torch

from tierserve.engine.sampler import Sampler, SamplingBatch
from tierserve.engine.spec_decode.stats import SpecDecodeCounters
from tierserve.engine.spec_decode.verifier import verify_request
from tierserve.sampling_params import SamplingParams

V = 8


def rows(*argmaxes: int) -> torch.Tensor:
    """Logits rows whose argmax is each given token (second best: the next id)."""
    out = torch.zeros(len(argmaxes), V)
    for i, t in enumerate(argmaxes):
        out[i, t] = 5.0
        out[i, (t + 1) % V] = 4.0
    return out


def run(logits, drafts, params, output=(), stop_ids=frozenset()):
    return verify_request(Sampler(), logits, drafts, params, None, [0, 1], list(output), set(stop_ids))


def test_greedy_accepts_the_matching_prefix_then_corrects():
    greedy = SamplingParams(temperature=0.0)
    v = run(rows(3, 5, 6, 2), [3, 5, 1], greedy)
    assert (v.token_ids, v.num_accepted) == ([3, 5, 6], 2)
    v = run(rows(3, 5, 6, 2), [3, 5, 6], greedy)  # all accepted: the bonus token from the last row
    assert (v.token_ids, v.num_accepted) == ([3, 5, 6, 2], 3)
    v = run(rows(3, 5), [4], greedy)
    assert (v.token_ids, v.num_accepted) == ([3], 0)


def test_greedy_with_penalty_sees_the_accepted_drafts():
    # row 1's argmax 3 is also draft 0: a strong repetition penalty applies only because draft 0 was accepted
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    v = run(rows(3, 3, 1), [3, 3], params)
    assert (v.token_ids, v.num_accepted) == ([3, 4], 1)  # 5.0 / 2 < 4.0: the second best wins
    # min_tokens masks the stop id at position 0 only (one output exists after the first accepted draft)
    v = run(rows(7, 7), [6], SamplingParams(temperature=0.0, min_tokens=1), stop_ids={7})
    assert (v.token_ids, v.num_accepted) == ([0], 0)  # 7 masked at position 0 -> best is 0 (logit 4.0)
    v = run(rows(6, 7), [6], SamplingParams(temperature=0.0, min_tokens=1), stop_ids={7})
    assert (v.token_ids, v.num_accepted) == ([6, 7], 1)


def test_greedy_logprobs_per_emitted_token():
    v = run(rows(3, 5), [3], SamplingParams(temperature=0.0, logprobs=1))
    assert v.token_ids == [3, 5]
    assert [lp.token_id for lp in v.logprobs] == [3, 5] and all(lp.rank == 1 for lp in v.logprobs)


def test_sampling_rows_draw_from_the_target_and_the_sampler_agrees():
    # a point mass (temperature tiny) makes sampling deterministic: drafts accepted iff they are the target
    params = SamplingParams(temperature=1e-3, seed=0)
    v = verify_request(Sampler(), rows(2, 4, 1), [2, 5], params, torch.Generator().manual_seed(0), [0], [], set())
    assert (v.token_ids, v.num_accepted) == ([2, 4], 1)
    batch = SamplingBatch([params], [None], [[0]], [[]], [set()])
    probs = Sampler().target_probs(rows(2), batch)
    assert probs.shape == (1, V) and float(probs[0, 2]) > 0.999


def test_counters():
    c = SpecDecodeCounters("ngram", 4)
    c.record(4, 2)
    c.record(3, 0)
    c.record(4, 4)
    s = c.snapshot()
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (3, 11, 6)
    assert s.accepted_per_position == (2, 2, 1, 1)
    assert s.mean_accepted_length == 3.0 and s.acceptance_rate == 6 / 11
