"""The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): verify one draft token.

Given the target distribution ``p`` (the sampler's final distribution at a
position: after min_tokens masking, penalties, temperature and truncation)
and the draft distribution ``q`` from which the draft token ``x`` was drawn:

    accept x          with probability min(1, p(x) / q(x))
    otherwise emit y  ~ norm(max(0, p - q))

The emitted token is then distributed exactly as ``p``. A deterministic
proposer (prompt lookup) has the point mass ``q = 1{x}``: accept with
probability ``p(x)``, and the residual is ``p`` with ``x`` removed,
renormalised (``point_mass_verify``). Greedy rows need no randomness: accept
iff ``x == argmax p`` (the verifier handles them without calling this).

Random numbers: ``u ~ U[0, 1)`` float64 from the request's own generator
(torch's default generator when None), one draw to decide and one more to
resample on rejection. Sampling from a distribution is by inverse CDF over
the vocabulary order, as the sampler does (tierserve/engine/sampler.py).
If the residual has no mass (p == q, so rejection had probability 0 and
only rounding can reach it), ``p`` itself is sampled.

Several drafts for one position (the children of a draft-tree node, tried in
order; SpecInfer's multi-step speculative sampling, as EAGLE): child ``c_i``
with draft distribution ``q_i`` is accepted with probability
``min(1, p(c_i) / q_i(c_i))``; on rejection ``p <- norm(max(p - q_i, 0))`` and the
next child is tried against that residual; if every child is rejected, the
token is drawn from the last residual (``multi_draft_verify``). For children
drawn independently from ``q`` the emitted token is distributed as ``p``; for
deterministic children (point masses, e.g. the top-k of a draft head) each
rejection removes the child from ``p``, so distinct children are accepted with
probability ``p(c_1)``, ``p(c_2)``, ... exactly as if sampled from ``p``.

Tests (tests/test_spec_rejection.py, tests/test_spec_tree_sampling.py): over many seeds on a small vocabulary,
the emitted token's empirical distribution equals ``p`` (chi-square), for a
point-mass draft and for a random ``q``; acceptance frequencies match
min(1, p/q).
"""

from __future__ import annotations

import torch


def uniform(generator: torch.Generator | None) -> float:
    """One float64 draw from U[0, 1) of ``generator`` (torch's default generator when None)."""
    return float(torch.rand(1, generator=generator, dtype=torch.float64)[0])


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The first index whose cumulative weight exceeds ``u * total`` (``weights`` [V] >= 0, total > 0)."""
    cdf = torch.cumsum(weights.double(), dim=0)
    idx = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)[0])
    return min(idx, weights.shape[0] - 1)


def verify_draft(p: torch.Tensor, q: torch.Tensor, draft: int,
                 generator: torch.Generator | None) -> tuple[int, bool]:
    """(emitted token, accepted) for ``draft`` drawn from ``q``; ``p`` and ``q`` are [V] distributions."""
    p, q = p.double(), q.double()
    qx, px = float(q[draft]), float(p[draft])
    if qx <= 0.0:
        raise ValueError(f"draft token {draft} has probability 0 under its own draft distribution")
    if uniform(generator) * qx < px:  # u < p(x) / q(x), without dividing
        return draft, True
    residual = (p - q).clamp(min=0.0)
    if float(residual.sum()) <= 0.0:
        residual = p
    return inverse_cdf(residual, uniform(generator)), False


def point_mass_verify(p: torch.Tensor, draft: int, generator: torch.Generator | None) -> tuple[int, bool]:
    """``verify_draft`` for a deterministic draft (``q`` the point mass at ``draft``), without building ``q``."""
    p = p.double()
    px = float(p[draft])
    if uniform(generator) < px:
        return draft, True
    residual = p.clone()
    residual[draft] = 0.0
    if float(residual.sum()) <= 0.0:
        residual = p
    return inverse_cdf(residual, uniform(generator)), False


def multi_draft_verify(p: torch.Tensor, children: list[int], qs: list[torch.Tensor | None],
                       generator: torch.Generator | None) -> tuple[int, int | None]:
    """(emitted token, index of the accepted child or None) for sibling drafts tried in order; ``qs[i]`` is
    child ``i``'s draft distribution, None for a deterministic draft (a point mass)."""
    p = p.double()
    for i, (x, q) in enumerate(zip(children, qs)):
        px = float(p[x])
        if q is None:
            if uniform(generator) < px:
                return x, i
            residual = p.clone()
            residual[x] = 0.0
        else:
            q = q.double()
            qx = float(q[x])
            if qx <= 0.0:
                raise ValueError(f"draft token {x} has probability 0 under its own draft distribution")
            if uniform(generator) * qx < px:
                return x, i
            residual = (p - q).clamp(min=0.0)
        total = float(residual.sum())
        if total > 0.0:  # no mass left: rejection had probability 0 (rounding); keep p
            p = residual / total
    return inverse_cdf(p, uniform(generator)), None
