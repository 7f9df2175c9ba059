"""Logit penalties and the min_tokens stop-token mask, applied before temperature.

Order and formulas (vLLM-compatible):

1. min_tokens: while a request has fewer than ``min_tokens`` outputs, the
   logits of its stop ids (eos unless ignore_eos, plus ``stop_token_ids``) are
   set to -inf.
2. Repetition penalty r (CTRL, Keskar et al. 2019; HF/vLLM form), over every
   token that appears in the prompt or the output so far:
   ``l' = l / r if l > 0 else l * r``. r = 1 disables.
3. Presence / frequency penalties (OpenAI), over output tokens only:
   ``l' = l - frequency * count(t) - presence * [count(t) > 0]``.
   0 disables each.

All three are vectorised over the rows that need them: the token lists are
padded into one [R, L] id tensor and turned into per-token counts with one
``scatter_add``; per-row penalties are [R, 1] tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tierserve.sampling_params import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 [R, V]: how often each token id occurs in each row's list."""
    rows = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.int32, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = torch.full((rows, width), vocab_size, dtype=torch.int64)
    for i, ids in enumerate(token_lists):
        if ids:
            padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    padded = padded.to(device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    prompt_token_ids: Sequence[Sequence[int]],
                    output_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Penalised copy of ``logits`` [R, V] (one row per entry of ``params``)."""
    vocab = logits.shape[-1]
    dev = logits.device
    out_counts = token_counts(output_token_ids, vocab, dev)
    logits = logits.clone()
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=dev)
    if bool((rep != 1.0).any()):
        seen = (token_counts(prompt_token_ids, vocab, dev) > 0) | (out_counts > 0)
        r = rep.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)
    logits -= freq.unsqueeze(1) * out_counts.to(logits.dtype)
    logits -= pres.unsqueeze(1) * (out_counts > 0).to(logits.dtype)
    return logits


def min_tokens_rows(params: Sequence[SamplingParams], output_token_ids: Sequence[Sequence[int]],
                    stop_ids: Sequence[set[int]] | None) -> list[int]:
    """Rows whose stop ids must still be masked (fewer outputs than min_tokens)."""
    if stop_ids is None:
        return []
    return [i for i, (p, out, ids) in enumerate(zip(params, output_token_ids, stop_ids))
            if ids and p.min_tokens > len(out)]


def mask_stop_ids(logits: torch.Tensor, rows: Sequence[int],
                  stop_ids: Sequence[set[int]]) -> torch.Tensor:
    """Copy of ``logits`` with each listed row's stop ids set to -inf (ids >= V ignored)."""
    vocab = logits.shape[-1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    for r in rows:
        for t in stop_ids[r]:
            if 0 <= t < vocab:
                row_idx.append(r)
                col_idx.append(t)
    logits = logits.clone()
    if row_idx:
        logits[torch.tensor(row_idx), torch.tensor(col_idx)] = float("-inf")
    return logits
