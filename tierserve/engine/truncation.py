"""Truncation filters: top-k, top-p, min-p, then Top-H, on temperature-scaled logits.

Rules (per row; each disabled value keeps everything):

* top-k (``k <= 0`` disables): keep tokens whose logit >= the k-th largest
  (ties at the boundary are kept);
* top-p (``p == 1`` disables), on the distribution left by top-k: sort
  descending; a token is kept iff the probability mass strictly before it is
  < p, plus every token tied with the last one kept (so the top-1 always stays);
* min-p (``0`` disables): keep tokens with ``prob >= min_p * max prob``, i.e.
  ``logit >= max logit + log(min_p)`` (min_p = 1 keeps exactly the ties of the max);
* Top-H (``0`` disables), on the distribution left by the three above:
  ``top_h.py``. Ties there are broken by position in the sorted window.

Each rule keeps a prefix of the descending order, so a row's result is a keep
*count*. The first three are closed under ties, so they are a logit
threshold (``logit >= cutoff``); Top-H is a positional prefix of at most 100.

Cost: instead of sorting the whole vocabulary, the rows' top
``W = max(WINDOW = 1024, max top_k + 1, 100)`` logits are taken with ``torch.topk``;
the softmax normaliser of an unrestricted row is the full-row logsumexp. A
row whose kept set reaches the window's end (a huge top-k/top-p/min-p set)
is recomputed with a full sort, so the result is always exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tierserve.engine.top_h import TOP_H_TOP_N, top_h_keep_counts
from tierserve.sampling_params import SamplingParams

#: Candidate tokens examined before falling back to a full-vocabulary sort.
WINDOW = 1024


def needs_truncation(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 or p.top_h > 0.0


def _floats(values: Sequence[float], device, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device)


def _prefix_lse(vals: torch.Tensor, count: torch.Tensor, full_lse: torch.Tensor) -> torch.Tensor:
    """log-normaliser of the kept prefix of length ``count`` (full row if count covers it)."""
    width = vals.shape[1]
    positions = torch.arange(width, device=vals.device).unsqueeze(0)
    masked = vals.double().masked_fill(positions >= count.unsqueeze(1), float("-inf"))
    return torch.where(count < width, torch.logsumexp(masked, dim=-1), full_lse)


def window_keep_counts(vals: torch.Tensor, params: Sequence[SamplingParams], full_lse: torch.Tensor,
                       vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep counts from each row's top-W scaled logits ``vals`` [R, W], sorted descending.

    ``full_lse`` [R] is the logsumexp of the whole row (float64). Returns
    ``(threshold_count, top_h_count, unresolved)``: how many survive
    top-k/top-p/min-p (tie-closed; ``vocab`` if none applies), how many of
    those survive Top-H (``vocab`` if disabled), and which rows need a wider
    window (some active rule reached the window's end with W < vocab).
    """
    rows, width = vals.shape
    dev = vals.device
    partial = width < vocab
    full = torch.full((rows,), vocab, dtype=torch.int64, device=dev)
    count = full.clone()
    unresolved = torch.zeros(rows, dtype=torch.bool, device=dev)

    def tie_closed(n: torch.Tensor) -> torch.Tensor:
        last = vals.gather(1, (n - 1).clamp(0, width - 1).unsqueeze(1))
        return (vals >= last).sum(dim=-1)

    def limit(active: torch.Tensor, n: torch.Tensor) -> None:
        nonlocal count, unresolved
        n = torch.where(active, n, full)
        if partial:
            unresolved = unresolved | (active & (n >= width))
        count = torch.minimum(count, n)

    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
    if bool((top_k > 0).any()):
        limit(top_k > 0, tie_closed(top_k.clamp(1, width)))

    top_p = _floats([p.top_p for p in params], dev)
    if bool((top_p < 1.0).any()):
        lse = _prefix_lse(vals, count, full_lse)
        positions = torch.arange(width, device=dev).unsqueeze(0)
        probs = torch.exp(vals.double() - lse.unsqueeze(1)).masked_fill(positions >= count.unsqueeze(1), 0.0)
        before = torch.cumsum(probs, dim=-1) - probs
        n_p = (before < top_p.unsqueeze(1)).sum(dim=-1).clamp(min=1)
        limit(top_p < 1.0, torch.where(n_p < width, tie_closed(n_p), n_p))

    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        log_min_p = _floats([math.log(m) if m > 0 else -math.inf for m in min_p], dev, vals.dtype)
        floor = vals[:, :1] + log_min_p.unsqueeze(1)
        limit(log_min_p > -math.inf, (vals >= floor).sum(dim=-1).clamp(min=1))

    alpha = _floats([p.top_h for p in params], dev)
    top_h_count = full.clone()
    if bool((alpha > 0).any()):
        lse = _prefix_lse(vals, count, full_lse)
        head = vals[:, :TOP_H_TOP_N].double()
        positions = torch.arange(head.shape[1], device=dev).unsqueeze(0)
        probs = torch.exp(head - lse.unsqueeze(1)).masked_fill(positions >= count.unsqueeze(1), 0.0)
        top_h_count = torch.where(alpha > 0, top_h_keep_counts(probs, alpha), full)
    return count, top_h_count, unresolved


def _keep_mask_rows(scaled: torch.Tensor, params: Sequence[SamplingParams], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask [R, V], unresolved [R]) using a top-``width`` window."""
    vocab = scaled.shape[1]
    if width >= vocab:
        vals, idx = torch.sort(scaled, dim=-1, descending=True, stable=True)
    else:
        vals, idx = torch.topk(scaled, width, dim=-1, sorted=True)
    full_lse = torch.logsumexp(scaled.double(), dim=-1)
    count, h_count, unresolved = window_keep_counts(vals, params, full_lse, vocab)
    cutoff = vals.gather(1, (count - 1).clamp(0, vals.shape[1] - 1).unsqueeze(1))
    keep = (scaled >= cutoff) | (count >= vocab).unsqueeze(1)
    h_rows = (h_count < vocab).nonzero().flatten()
    if h_rows.numel():
        positions = torch.arange(vals.shape[1], device=scaled.device).unsqueeze(0)
        in_head = positions < h_count[h_rows].unsqueeze(1)
        keep[h_rows] = torch.zeros_like(keep[h_rows]).scatter_(1, idx[h_rows], in_head)
    return keep, unresolved


def truncation_mask(scaled: torch.Tensor, params: Sequence[SamplingParams],
                    window: int = WINDOW) -> torch.Tensor:
    """Bool [R, V]: the tokens each row may sample, from temperature-scaled logits."""
    vocab = scaled.shape[1]
    max_k = max((p.top_k for p in params), default=0)
    width = min(vocab, max(window, max_k + 1, TOP_H_TOP_N))
    keep, unresolved = _keep_mask_rows(scaled, params, width)
    redo = unresolved.nonzero().flatten()
    if redo.numel():
        sub = [params[i] for i in redo.tolist()]
        keep[redo] = _keep_mask_rows(scaled[redo], sub, vocab)[0]
    return keep
