"""The tree speculative-sampling rule keeps the target distribution (chi-square over many seeds).

Setting: a 6-token vocabulary, target ``p`` and draft ``q`` fixed random
distributions with every probability >= 0.05. Each trial uses its own seeded
generator (trial ``i``: seed ``i``), so the trials are independent.

Test statistic: Pearson's ``X2 = sum_x (n_x - N p_x)^2 / (N p_x)`` over the
V = 6 outcomes. Under the null hypothesis (emitted ~ p) ``X2`` is
asymptotically chi-square with V - 1 = 5 degrees of freedom; the
approximation holds here since every expected count ``N p_x >= 0.05 N >= 100``
(the usual rule asks for 5; case 3's conditional counts, over >= 150
trials, still have >= 7.5). We reject at ``chi2.ppf(1 - 1e-4, 5) = 25.7``, so
each assertion fails by chance with probability 1e-4. Power: the naive rule
that samples the fallback from ``p`` instead of the residual (or that forgets to
renormalise) over-weights the rejected children by ~p(c) * P(reject); with
N = 3000 that moves counts by far more than sqrt(N p) and gives X2 in the
hundreds, which the tests assert too (so they can fail).

Cases: (1) deterministic distinct children (a draft head's top-k: point
masses), (2) children drawn i.i.d. from ``q`` (SpecInfer's multi-step
speculative sampling, residual ``norm(max(p - q, 0))``; the rule that accepts
with min(1, p/q) but falls back to ``p`` must fail), (3) a depth-2 tree
through ``verify_tree`` and the engine's Sampler at temperature 1: the first
emitted token ~ p_root and, when a node was accepted and the walk went on,
the second ~ p(. | first).
"""

from __future__ import annotations

import torch
from scipy.stats import chi2

from tierserve.engine.sampler import Sampler
from tierserve.engine.spec_decode.rejection import inverse_cdf, multi_draft_verify, uniform
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.engine.spec_decode.tree_verifier import verify_tree
from tierserve.sampling_params import SamplingParams

V = 6
N = 3000
LIMIT = chi2.ppf(1 - 1e-4, V - 1)


def dist(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 0.05 + torch.rand(V, generator=g, dtype=torch.float64)
    w = w / w.sum()
    return (0.05 + 0.7 * w) / (0.05 * V + 0.7)  # every entry >= 0.05 / 1.0


def pearson(counts: list[int], p: torch.Tensor) -> float:
    n = sum(counts)
    expected = n * p
    return float(((torch.tensor(counts, dtype=torch.float64) - expected) ** 2 / expected).sum())


def naive(p, children, qs, g):
    """The rule without the residual update (every child tried against p, fallback drawn from p): biased."""
    for i, x in enumerate(children):
        if uniform(g) < float(p[x]):
            return x, i
    return inverse_cdf(p, uniform(g)), None


def naive_q(p, children, qs, g):
    """min(1, p/q) per child but the fallback drawn from p (no residual): biased towards the drafts."""
    for i, (x, q) in enumerate(zip(children, qs)):
        if uniform(g) * float(q[x]) < float(p[x]):
            return x, i
    return inverse_cdf(p, uniform(g)), None


def emitted_counts(rule, p, draw_children) -> list[int]:
    counts = [0] * V
    for trial in range(N):
        g = torch.Generator().manual_seed(trial)
        children, qs = draw_children(g)
        token, _ = rule(p, children, qs, g)
        counts[token] += 1
    return counts


def test_deterministic_sibling_children():
    p = dist(1)
    draw = lambda g: ([4, 1, 2], [None, None, None])  # noqa: E731
    assert pearson(emitted_counts(multi_draft_verify, p, draw), p) < LIMIT
    assert pearson(emitted_counts(naive, p, draw), p) > 10 * LIMIT


def test_children_drawn_iid_from_the_draft():
    p, q = dist(2), dist(3)

    def draw(g):
        kids = [inverse_cdf(q, uniform(g)) for _ in range(3)]
        return kids, [q, q, q]

    assert pearson(emitted_counts(multi_draft_verify, p, draw), p) < LIMIT
    assert pearson(emitted_counts(naive_q, p, draw), p) > 10 * LIMIT


def test_depth_two_tree_through_the_verifier():
    """Root children 4, 1 (point masses); 4 has children 0, 5; 1 has child 2. Logits rows are log p."""
    tree = DraftTree((4, 1, 0, 5, 2), (-1, -1, 0, 0, 1))
    root, after4, after1 = dist(4), dist(5), dist(6)
    rows = [root, after4, after1, dist(7), dist(8), dist(9)]  # rows of nodes 0..4 (leaves: bonus rows)
    logits = torch.stack(rows).log().float()
    params = SamplingParams(temperature=1.0)
    first = [0] * V
    second = {4: [0] * V, 1: [0] * V}
    sampler = Sampler()
    for trial in range(N):
        g = torch.Generator().manual_seed(trial)
        got = verify_tree(sampler, logits, tree, params, g, [1], [], set())
        first[got.token_ids[0]] += 1
        if got.path and len(got.token_ids) > 1:
            second[got.token_ids[0]][got.token_ids[1]] += 1
    assert pearson(first, root.float().double()) < LIMIT
    assert pearson(second[4], after4.float().double()) < LIMIT and sum(second[4]) > 0.1 * N
    assert pearson(second[1], after1.float().double()) < LIMIT and sum(second[1]) > 0.05 * N
