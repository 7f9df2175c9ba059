"""Top-H: uniform-count property, monotonicity in alpha, and both implementations of the module (the loop
``top_h_keep_count_reference`` and the vectorised ``top_h_keep_counts``) against two references written
here: a brute force over every prefix length (entropy terms re-summed from scratch with ``math.fsum``) and
a transcription of the paper code's stopping rule (renormalised prefix entropy)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tierserve.engine.top_h import (
    TOP_H_DEFAULT_ALPHA,
    TOP_H_TOP_N,
    top_h_filter,
    top_h_keep_count_reference,
    top_h_keep_counts,
)


def _brute_force_keep(probs, alpha: float) -> int:
    """The largest k <= n = min(100, V) whose k most likely tokens (all with p > 0) have entropy terms
    S(k) = -sum p log2 p <= alpha S(n) (relative slack 1e-6, the module's documented tie rule), at least 1.
    Every prefix is summed from scratch (no running sum, no early stop)."""
    top = sorted((float(p) for p in probs), reverse=True)[:TOP_H_TOP_N]
    terms = [-p * math.log2(p) if p > 0 else 0.0 for p in top]
    tau = alpha * math.fsum(terms)
    fits = [k for k in range(1, len(top) + 1) if top[k - 1] > 0 and math.fsum(terms[:k]) <= tau * (1 + 1e-6)]
    return max(fits, default=1)


def _uniform_logits(m: int, vocab: int) -> torch.Tensor:
    logits = torch.full((vocab,), float("-inf"))
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(m))[:m]
    logits[perm] = 3.0
    return logits


def _sorted_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True, stable=True).values


def test_defaults():
    assert TOP_H_TOP_N == 100
    assert TOP_H_DEFAULT_ALPHA == 0.4


@pytest.mark.parametrize("m", [1, 2, 3, 7, 10, 33, 64, 99, 100])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.4, 0.5, 0.7, 0.95, 1.0])
def test_uniform_keeps_floor_alpha_m(m, alpha):
    expected = max(1, math.floor(Fraction(str(alpha)) * m))
    logits = _uniform_logits(m, vocab=300)
    probs = torch.softmax(logits, dim=-1)
    assert _brute_force_keep(probs.tolist(), alpha) == expected
    assert top_h_keep_count_reference(probs, alpha) == expected
    got = top_h_keep_counts(_sorted_probs(logits)[None], torch.tensor([alpha]))
    assert got.tolist() == [expected]
    filtered = top_h_filter(logits[None] , torch.tensor([alpha]))[0]
    kept = torch.isfinite(filtered)
    assert int(kept.sum()) == expected
    assert bool(torch.isfinite(logits[kept]).all())  # only tokens of the uniform support


def test_uniform_small_vocab_uses_whole_vocab():
    # V < 100: n = V.
    for m in (1, 4, 9):
        logits = torch.zeros(m)
        probs = torch.softmax(logits, -1)
        assert top_h_keep_count_reference(probs, 0.5) == _brute_force_keep(probs.tolist(), 0.5) == max(1, m // 2)


def _reference_rule(probs: list[float], alpha: float) -> int:
    """Independent transcription of the reference loop's arithmetic (bits,
    renormalised prefix entropy H/sigma + log2 sigma compared with
    tau/sigma + log2 sigma, tau from the renormalised top-n entropy)."""
    top = sorted(probs, reverse=True)[:TOP_H_TOP_N]
    a = sum(top)
    h_norm = -sum((p / a) * math.log2(p / a) for p in top)
    tau = (h_norm - math.log2(a)) * a * alpha
    kept = 1
    h = -top[0] * math.log2(top[0])
    sigma = top[0]
    for p in top[1:]:
        h -= p * math.log2(p)
        sigma += p
        if h / sigma + math.log2(sigma) > tau / sigma + math.log2(sigma):
            break
        kept += 1
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_rule_on_peaked_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 500
    logits = torch.randn(vocab, generator=g, dtype=torch.float64) * (1 + seed)
    probs = torch.softmax(logits, dim=-1)
    for alpha in (0.1, 0.4, 0.8):
        want = _brute_force_keep(probs.tolist(), alpha)
        assert top_h_keep_count_reference(probs, alpha) == _reference_rule(probs.tolist(), alpha) == want


def test_kept_set_grows_weakly_with_alpha():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 1000, generator=g) * torch.linspace(0.3, 4.0, 8)[:, None]
    sp = _sorted_probs(logits)
    previous = torch.ones(8, dtype=torch.int64)
    prev_mask = torch.zeros_like(logits, dtype=torch.bool)
    for alpha in torch.linspace(0.01, 1.0, 40):
        counts = top_h_keep_counts(sp, torch.full((8,), float(alpha), dtype=torch.float64))
        assert bool((counts >= previous).all())
        mask = torch.isfinite(top_h_filter(logits, torch.full((8,), float(alpha))))
        assert bool((mask | ~prev_mask).all())  # previous kept set is a subset
        previous, prev_mask = counts, mask
    assert int(previous.max()) > 1


def test_vectorised_equals_loop():
    g = torch.Generator().manual_seed(1)
    rows = 40
    logits = torch.randn(rows, 2000, generator=g) * torch.rand(rows, 1, generator=g) * 6
    logits[::5, 50:] = float("-inf")  # some rows with fewer than 100 live tokens
    logits[3, 1:] = float("-inf")     # a one-hot row
    alpha = torch.rand(rows, generator=g, dtype=torch.float64).clamp(min=0.02)
    probs = torch.softmax(logits, dim=-1)
    counts = top_h_keep_counts(_sorted_probs(logits), alpha)
    expected = [_brute_force_keep(probs[i].tolist(), float(alpha[i])) for i in range(rows)]
    assert counts.tolist() == expected
    assert [top_h_keep_count_reference(probs[i], float(alpha[i])) for i in range(rows)] == expected
    assert counts[3] == 1
    assert len(set(expected)) > 5


def test_filter_keeps_most_likely_prefix():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9, -2.0, 3.0]])
    out = top_h_filter(logits, torch.tensor([0.95]))[0]
    kept = torch.isfinite(out).nonzero().flatten().tolist()
    n = _brute_force_keep(torch.softmax(logits[0], -1).tolist(), 0.95)
    assert n == 3  # a real cut (alpha 0.5 keeps only the top-1)
    order = torch.argsort(logits[0], descending=True).tolist()
    assert sorted(kept) == sorted(order[:n])
    assert torch.equal(out[torch.isfinite(out)], logits[0][torch.isfinite(out)])
