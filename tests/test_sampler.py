"""Sampler: greedy, truncation filters, penalties, seeding, sampling frequencies,
logprobs and min_tokens, each against an independent hand/numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tierserve.engine.penalties import apply_penalties
from tierserve.engine.sampler import Sampler, SamplingBatch
from tierserve.engine.truncation import truncation_mask
from tierserve.sampling_params import SamplingParams as SP


def _batch(params, generators=None, prompts=None, outputs=None, stop_ids=None):
    n = len(params)
    return SamplingBatch(
        params=list(params),
        generators=list(generators) if generators is not None else [None] * n,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        stop_ids=stop_ids if stop_ids is not None else [],
    )


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _keep_count(logits_row, params, window=4):
    """Kept-set size; also checks the small-window path against a full sort."""
    scaled = (logits_row / params.temperature)[None]
    mask = truncation_mask(scaled, [params], window=window)
    assert torch.equal(mask, truncation_mask(scaled, [params], window=scaled.shape[1]))
    return int(mask.sum())


# ------------------------------------------------------------------ greedy
def test_greedy_is_argmax_fast_path_and_mixed():
    logits = torch.randn(7, 300, generator=_gen(0))
    expected = [int(np.argmax(row)) for row in logits.numpy()]
    out = Sampler()(logits, _batch([SP(temperature=0)] * 7))
    assert out.token_ids == expected
    assert out.logprobs == [None] * 7
    mixed = [SP(temperature=0) if i % 2 == 0 else SP(temperature=1.3) for i in range(7)]
    out = Sampler()(logits, _batch(mixed))
    assert [out.token_ids[i] for i in range(0, 7, 2)] == expected[0::2]


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 3.0, 50.0])
def test_top_k_one_equals_greedy(temperature):
    logits = torch.randn(16, 500, generator=_gen(1)) * 0.5
    expected = logits.argmax(dim=-1).tolist()
    params = [SP(temperature=temperature, top_k=1)] * 16
    for step in range(5):
        out = Sampler()(logits, _batch(params, [_gen(step * 100 + i) for i in range(16)]))
        assert out.token_ids == expected


# ---------------------------------------------------------- truncation rules
def test_top_p_tiny_keeps_only_top_token():
    logits = torch.randn(200, generator=_gen(2))
    p = SP(temperature=1.0, top_p=1e-6)
    assert _keep_count(logits, p) == 1
    out = Sampler()(logits.expand(300, -1).contiguous(), _batch([p] * 300, [_gen(7)] * 300))
    assert set(out.token_ids) == {int(logits.argmax())}


def test_top_p_ties_and_boundaries():
    # probs proportional to [4, 2, 2, 1, 1] / 10.
    logits = torch.log(torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0]))
    assert _keep_count(logits, SP(top_p=0.4)) == 1       # mass 0.4 reached by the top token
    assert _keep_count(logits, SP(top_p=0.41)) == 3      # needs one 0.2 token; its tie comes too
    assert _keep_count(logits, SP(top_p=0.6)) == 3
    assert _keep_count(logits, SP(top_p=0.81)) == 5      # needs a 0.1 token; its tie comes too
    assert _keep_count(logits, SP(top_p=1.0)) == 5
    tied_top = torch.zeros(6)
    assert _keep_count(tied_top, SP(top_p=1e-6)) == 6    # all tied with the top token


def test_top_p_one_keeps_everything_even_tiny_tail():
    logits = torch.cat([torch.tensor([30.0]), torch.full((999,), -30.0)])
    assert _keep_count(logits, SP(top_p=1.0)) == 1000
    assert _keep_count(logits, SP(top_p=0.999)) == 1


def test_top_k_keeps_ties_and_disables():
    logits = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.0])
    assert _keep_count(logits, SP(top_k=2)) == 3
    assert _keep_count(logits, SP(top_k=1)) == 1
    assert _keep_count(logits, SP(top_k=0)) == 5
    assert _keep_count(logits, SP(top_k=-1)) == 5
    assert _keep_count(logits, SP(top_k=99)) == 5


def test_min_p():
    logits = torch.tensor([2.0, 2.0, 1.9, -1.0, 0.5])
    assert _keep_count(logits, SP(min_p=1.0)) == 2       # only ties of the max
    assert _keep_count(logits, SP(min_p=0.0)) == 5
    # p_i / p_max = exp(l_i - 2): 1, 1, .905, .0498, .223
    assert _keep_count(logits, SP(min_p=0.2)) == 4
    assert _keep_count(logits, SP(min_p=0.9)) == 3
    assert _keep_count(logits, SP(min_p=0.95)) == 2


def test_filters_compose_in_order():
    # temperature 1: probs of [3, 2, 1, 0, -1] logits.
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    # top-k=4 renormalises over 4 tokens, then top-p=0.9 on that distribution.
    p4 = np.exp([3.0, 2.0, 1.0, 0.0]) / np.exp([3.0, 2.0, 1.0, 0.0]).sum()
    expected = int(np.argmax(np.cumsum(p4) >= 0.9)) + 1
    assert _keep_count(logits, SP(top_k=4, top_p=0.9)) == expected
    assert _keep_count(logits, SP(top_k=2, top_p=0.999, min_p=0.01)) == 2


def test_window_fallback_equals_full_sort():
    g = _gen(12)
    rows, vocab = 24, 3000
    logits = torch.randn(rows, vocab, generator=g) * torch.linspace(0.05, 5.0, rows)[:, None]
    logits[::4, :7] = 2.0                                 # tied tops
    params = [
        SP(top_k=[0, 3, 40, 2000][i % 4], top_p=[1.0, 0.5, 0.95, 0.999][(i // 4) % 4],
           min_p=[0.0, 0.02][i % 2], top_h=[0.0, 0.4, 0.9][i % 3])
        for i in range(rows)
    ]
    full = truncation_mask(logits, params, window=vocab)
    for window in (8, 128, 1024):
        assert torch.equal(truncation_mask(logits, params, window=window), full)
    sizes = full.sum(dim=-1)
    assert int(sizes.min()) >= 1 and int(sizes.max()) > 1024    # the fallback was exercised


# ---------------------------------------------------------------- penalties
def test_penalties_against_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = [SP(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    prompt = [[0, 1]]          # token 0 (positive), 1 (negative)
    output = [[3, 3, 4]]       # 3 twice, 4 once
    got = apply_penalties(logits, params, prompt, output)[0].tolist()
    expected = [
        2.0 / 2.0,                             # in prompt, > 0: divided
        -1.0 * 2.0,                            # in prompt, < 0: multiplied
        0.5,                                   # unseen
        3.0 / 2.0 - 0.25 * 2 - 0.5,            # output x2: repetition, frequency, presence
        -2.0 * 2.0 - 0.25 * 1 - 0.5,           # output x1
        1.0,                                   # unseen
    ]
    assert got == pytest.approx(expected, abs=1e-6)


def test_penalties_change_greedy_choice_only_for_their_row():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SP(temperature=0, frequency_penalty=0.5), SP(temperature=0)]
    out = Sampler()(logits, _batch(params, outputs=[[0], [0]]))
    assert out.token_ids == [1, 0]
    params = [SP(temperature=0, repetition_penalty=1.1), SP(temperature=0)]
    out = Sampler()(logits, _batch(params, prompts=[[0], [0]]))   # 3/1.1 = 2.73 < 2.9
    assert out.token_ids == [1, 0]


# ----------------------------------------------------------------- seeding
def _run_steps(rows_params, gens, logits_seq):
    tokens = []
    for logits in logits_seq:
        tokens.append(Sampler()(logits, _batch(rows_params, gens)).token_ids)
    return tokens


def test_seeded_request_same_alone_and_in_batch():
    vocab, steps = 400, 12
    logits_seq = [torch.randn(4, vocab, generator=_gen(50 + s)) for s in range(steps)]
    target = SP(temperature=0.9, top_k=50, top_p=0.95, seed=123)
    alone = _run_steps([target], [_gen(123)], [lg[1:2] for lg in logits_seq])
    others = [SP(temperature=1.5, seed=9), target, SP(temperature=0), SP(temperature=0.8, min_p=0.1)]
    batched = _run_steps(others, [_gen(9), _gen(123), None, None], logits_seq)
    assert [row[0] for row in alone] == [row[1] for row in batched]
    reordered = [SP(temperature=0.8, min_p=0.1), target]
    again = _run_steps(reordered, [None, _gen(123)], [lg[[3, 1]] for lg in logits_seq])
    assert [row[1] for row in again] == [row[0] for row in alone]


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {seed: _run_steps([SP(temperature=1.0)], [_gen(seed)], [logits] * 20) for seed in (1, 2)}
    assert draws[1] != draws[2]


# ------------------------------------------------------- sampling frequencies
def _expected_distribution(logits, temperature, top_k, top_p):
    """Independent numpy: softmax(l/T) -> top-k -> renormalise -> top-p -> renormalise."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    keep[order[:top_k]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    sorted_p = p[order]
    mass_before = np.cumsum(sorted_p) - sorted_p
    keep = np.zeros_like(keep)
    keep[order[mass_before < top_p]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def test_sampling_frequencies_match_filtered_distribution():
    logits = torch.tensor([1.0, 0.2, 2.0, -0.5, 1.5, 0.0, -3.0, 0.7])
    temperature, top_k, top_p = 0.8, 6, 0.9
    expected = _expected_distribution(logits.numpy(), temperature, top_k, top_p)
    n = 40000
    params = SP(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = _gen(2024)
    out = Sampler()(logits.expand(n, -1).contiguous(), _batch([params] * n, [gen] * n))
    counts = np.bincount(out.token_ids, minlength=8)
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    assert support.sum() >= 4
    e = expected[support] * n
    chi2 = float(((counts[support] - e) ** 2 / e).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, counts, expected)


def test_top_h_sampling_stays_in_kept_set():
    logits = torch.randn(300, generator=_gen(5)) * 2
    params = SP(temperature=1.0, top_h=0.4)
    n_keep = _keep_count(logits, params)
    allowed = set(truncation_mask(logits[None], [params])[0].nonzero().flatten().tolist())
    assert len(allowed) == n_keep
    out = Sampler()(logits.expand(2000, -1).contiguous(), _batch([params] * 2000, [_gen(3)] * 2000))
    assert set(out.token_ids) <= allowed
    assert 1 < n_keep < 100 and len(set(out.token_ids)) > 1


# ---------------------------------------------------------------- logprobs
def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = torch.randn(3, 64, generator=_gen(11)) * 3
    params = [SP(temperature=0.7, logprobs=5, repetition_penalty=1.5),
              SP(temperature=0, logprobs=0), SP(temperature=1.0)]
    before = logits.clone()
    out = Sampler()(logits, _batch(params, [_gen(1), None, None], prompts=[[0, 1, 2], [], []]))
    assert torch.equal(logits, before)                   # the caller's logits are not modified
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for row in (0, 1):
        lp = out.logprobs[row]
        tok = out.token_ids[row]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(ref[row, tok]), abs=1e-6)
        order = torch.argsort(ref[row], descending=True).tolist()
        assert lp.rank == order.index(tok) + 1
        n = params[row].logprobs
        assert [t for t, _ in lp.top] == order[:n]
        assert [v for _, v in lp.top] == pytest.approx(ref[row, order[:n]].tolist(), abs=1e-6)
    assert out.logprobs[1].rank == 1 and out.logprobs[1].top == []


# -------------------------------------------------------------- min_tokens
def test_min_tokens_masks_stop_ids_until_reached():
    eos, stop = 5, 2
    logits = torch.zeros(1, 10)
    logits[0, eos], logits[0, stop], logits[0, 7] = 9.0, 8.0, 7.0
    p = SP(temperature=0, min_tokens=3, stop_token_ids=(stop,))

    def pick(n_out):
        return Sampler()(logits, _batch([p], outputs=[[1] * n_out], stop_ids=[{eos, stop}])).token_ids[0]

    assert pick(0) == 7 and pick(2) == 7
    assert pick(3) == eos
    sampled = Sampler()(logits.expand(200, -1).contiguous(),
                        _batch([SP(temperature=2.0, min_tokens=1)] * 200, [_gen(4)] * 200,
                               stop_ids=[{eos, stop}] * 200)).token_ids
    assert eos not in sampled and stop not in sampled
