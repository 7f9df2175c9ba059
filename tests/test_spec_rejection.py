"""The speculative-sampling rule keeps the target distribution: chi-square over many seeds, small vocabulary.

For each trial a fresh generator (seed = trial index) drives the rule; the
emitted tokens' counts are tested against ``p`` (they must fit) and against
the draft distribution (they must not: the test can tell the two apart).
"""

from __future__ import annotations

import torch

from tierserve.engine.spec_decode.rejection import (
    inverse_cdf,
    point_mass_verify,
    verify_draft,
)

P = torch.tensor([0.05, 0.30, 0.0, 0.25, 0.15, 0.25], dtype=torch.float64)
TRIALS = 12000
#: upper tail of the chi-square distribution: CHI2[df][alpha] (scipy.stats.chi2.isf(alpha, df))
CHI2 = {4: {1e-3: 18.4668, 1e-6: 33.3768}, 5: {1e-3: 20.5150, 1e-6: 35.8882}}


def _fits(counts: list[int], dist: torch.Tensor) -> float:
    """The smallest tabulated alpha at which the counts are *not* rejected as draws from ``dist`` (0.0: rejected
    at 1e-6 already); tokens outside the support must never appear."""
    support = [i for i in range(len(counts)) if dist[i] > 0]
    if any(counts[i] for i in range(len(counts)) if dist[i] == 0):
        return 0.0
    n = sum(counts)
    stat = sum((counts[i] - float(dist[i]) * n) ** 2 / (float(dist[i]) * n) for i in support)
    crit = CHI2[len(support) - 1]
    return 1e-3 if stat < crit[1e-3] else 1e-6 if stat < crit[1e-6] else 0.0


def test_point_mass_draft_keeps_p():
    for draft in (1, 4):  # a likely and a less likely draft
        counts, accepted = [0] * len(P), 0
        for trial in range(TRIALS):
            token, ok = point_mass_verify(P, draft, torch.Generator().manual_seed(trial))
            counts[token] += 1
            accepted += ok
        assert _fits(counts, P) >= 1e-3, (draft, counts)
        assert abs(accepted / TRIALS - float(P[draft])) < 4 * (0.25 / TRIALS) ** 0.5
        point = torch.zeros_like(P)
        point[draft] = 1.0
        mix = 0.5 * point + 0.5 * P  # a wrong rule's output would look like this: the test must see it
        assert _fits(counts, mix) == 0.0


def test_random_draft_distribution_keeps_p():
    q = torch.tensor([0.30, 0.05, 0.20, 0.25, 0.10, 0.10], dtype=torch.float64)
    draws = torch.Generator().manual_seed(12345)
    counts, accepted = [0] * len(P), 0
    for trial in range(TRIALS):
        x = inverse_cdf(q, float(torch.rand(1, generator=draws, dtype=torch.float64)))
        token, ok = verify_draft(P, q, x, torch.Generator().manual_seed(trial))
        counts[token] += 1
        accepted += ok
    assert _fits(counts, P) >= 1e-3, counts
    expected_accept = float(torch.minimum(P, q).sum())  # sum_x q(x) min(1, p(x)/q(x))
    assert abs(accepted / TRIALS - expected_accept) < 4 * (0.25 / TRIALS) ** 0.5
    assert _fits(counts, q) == 0.0


def test_certain_draft_is_always_accepted_and_impossible_never():
    p = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert all(point_mass_verify(p, 1, g) == (1, True) for _ in range(50))
    assert all(point_mass_verify(p, 2, g) == (1, False) for _ in range(50))
