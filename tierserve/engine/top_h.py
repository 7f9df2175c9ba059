"""Top-H truncation: keep the head of the distribution under an entropy budget.

Top-H (Baghaei Potraghloo et al., "Top-H Decoding: Adapting the Creativity and
Coherence with Bounded Entropy in Text Generation", 2025). This module follows
the paper's reference ``logit_processor.py`` (``TopH_LogitsProcessor``) and
states exactly what that code computes, in bits:

    p        = softmax(logits / T)                  (T applied by the sampler)
    p_1..p_n = the n = min(100, V) largest probabilities, descending (not renormalised)
    S(k)     = -sum_{i<=k} p_i * log2(p_i)          (cumulative entropy terms, 0*log 0 = 0)
    tau      = alpha * S(n)

The reference writes tau as ``alpha * A * (H(q) - log2 A)`` with ``q = p/A`` the
renormalised top-n distribution and ``A = sum p_i``; algebraically that is
``alpha * S(n)`` with the raw probabilities. Its loop stops before adding token
k+1 once ``H(q_{1..k+1}) > tau / sigma + log2 sigma`` (``sigma`` the prefix
mass), which is the same as ``S(k+1) > tau``. So the kept set is the first

    k = max(1, max{k <= n : S(k) <= tau})

tokens (the top-1 is always kept) and everything else is masked to -inf; the
sampler then renormalises. When the top-n mass A is 1 (e.g. a uniform
distribution over m <= 100 tokens), this equals the "renormalised top-n"
reading: uniform over m keeps exactly max(1, floor(alpha * m)) tokens.

Deviations from the reference, both on measure-zero edge cases:
  * tokens with p == 0 are never kept (the reference's 0 * log2(0) is NaN and
    its loop then never stops, running past the top-n);
  * the comparison is ``S(k) <= tau * (1 + 1e-6)``, computed in float64, so an
    exact tie (alpha * m an integer for a uniform) is not lost to the float32
    rounding of alpha or of the probabilities.

Ties between equal probabilities are broken by a stable sort (lower token id
first). ``alpha`` is ``SamplingParams.top_h`` (0 disables; the recommended
default is ``TOP_H_DEFAULT_ALPHA`` = 0.4).

``top_h_keep_count_reference`` is the per-row loop (mirrors the reference);
``top_h_keep_counts`` is the vectorised batch version used by the sampler.
Tests check that they agree, the uniform-distribution count, and that the
kept set grows weakly with alpha.
"""

from __future__ import annotations

import math

import torch

from tierserve.sampling_params import TOP_H_DEFAULT_ALPHA

#: How many of the most likely tokens Top-H considers (reference ``top_n``).
TOP_H_TOP_N = 100
#: Relative slack on the entropy budget comparison (float rounding only).
TOP_H_REL_TOL = 1e-6

__all__ = ["TOP_H_DEFAULT_ALPHA", "TOP_H_TOP_N", "top_h_keep_count_reference",
           "top_h_keep_counts", "top_h_filter"]


def top_h_keep_count_reference(probs: torch.Tensor, alpha: float, top_n: int = TOP_H_TOP_N) -> int:
    """How many of the most likely tokens of one distribution ``probs`` [V] Top-H keeps.

    A plain Python loop over the sorted top-n, written after the reference.
    """
    sorted_p = torch.sort(probs.double(), descending=True, stable=True).values[: min(top_n, probs.numel())]
    values = [float(v) for v in sorted_p]
    tau = alpha * sum(-v * math.log2(v) for v in values if v > 0.0)
    limit = tau * (1.0 + TOP_H_REL_TOL)
    kept = 1
    cumulative = -values[0] * math.log2(values[0]) if values[0] > 0.0 else 0.0
    for v in values[1:]:
        if v <= 0.0:
            break
        cumulative += -v * math.log2(v)
        if cumulative > limit:
            break
        kept += 1
    return kept


def top_h_keep_counts(sorted_probs: torch.Tensor, alpha: torch.Tensor,
                      top_n: int = TOP_H_TOP_N) -> torch.Tensor:
    """Vectorised keep counts for a batch.

    ``sorted_probs`` [B, V'] are each row's probabilities sorted descending
    (V' >= min(top_n, V) columns suffice); ``alpha`` [B] in (0, 1]. Returns
    int64 [B], each in [1, min(top_n, V')].
    """
    head = sorted_probs[:, :top_n].double()
    terms = -torch.special.xlogy(head, head) / math.log(2.0)
    cumulative = torch.cumsum(terms, dim=-1)
    tau = alpha.double() * cumulative[:, -1]
    within = (cumulative <= (tau * (1.0 + TOP_H_REL_TOL)).unsqueeze(1)) & (head > 0)
    # cumulative is non-decreasing and positive probabilities form a prefix,
    # so ``within`` is a prefix: its length is the count.
    return within.sum(dim=-1).clamp(min=1)


def top_h_filter(logits: torch.Tensor, alpha: torch.Tensor, top_n: int = TOP_H_TOP_N) -> torch.Tensor:
    """Mask (to -inf) every token Top-H drops, for logits [B, V] already divided by T."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    counts = top_h_keep_counts(sorted_probs, alpha, top_n)
    positions = torch.arange(logits.shape[-1], device=logits.device)
    keep_sorted = positions.unsqueeze(0) < counts.unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))
