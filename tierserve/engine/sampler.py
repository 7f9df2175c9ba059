"""The sampler: logits [B, V] -> one token per row (plus optional logprobs).

Per row, in this order (vLLM-compatible):

1. min_tokens: stop ids masked to -inf while ``len(output) < min_tokens``;
2. penalties: repetition (multiplicative, prompt + output), presence and
   frequency (additive, output) -- see ``penalties.py``;
3. temperature: ``temperature == 0`` is greedy, ``argmax`` of the penalised
   logits (ties -> lowest id); otherwise ``logits / T``;
4-7. truncation, in this order: top-k, top-p, min-p, Top-H -- exact rules,
   tie handling and the top-1024 candidate window in ``truncation.py``;
8. sample by inverse CDF: ``u ~ U[0, 1)`` drawn as ``torch.rand(1,
   generator=g)`` from the row's own generator, token = first index whose
   cumulative probability (float64, vocabulary order) exceeds ``u * total``.
   An exact sample of the filtered distribution; a seeded row draws exactly
   one number from its generator per step, so its tokens do not depend on
   what else is in the batch (or on the vocabulary size). Rows without a
   generator share one ``torch.rand`` draw from torch's default generator.

Per-row parameters are tensors and every stage is batched over rows; the
only Python loop over rows draws from per-row generators. Fast path: if every
row is greedy with no penalties, no logprobs and no min_tokens mask, the whole
step is one ``argmax``.

Logprobs are of the raw model distribution (``logprobs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tierserve.engine.logprobs import TokenLogprobs, compute_logprobs
from tierserve.engine.penalties import apply_penalties, mask_stop_ids, min_tokens_rows, needs_penalties
from tierserve.engine.truncation import needs_truncation, truncation_mask
from tierserve.kernels.decoder_rows_cpu import argmax
from tierserve.sampling_params import SamplingParams

__all__ = ["SamplingBatch", "SamplerOutput", "TokenLogprobs", "Sampler"]


@dataclass
class SamplingBatch:
    """One row per request that samples this step.

    ``generators[i]`` is the request's own generator (seeded by the engine) or
    None for torch's default generator. ``stop_ids[i]`` (eos + stop_token_ids)
    is masked only while ``min_tokens > len(output_token_ids[i])``; an empty
    list means no row needs it.
    """

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    stop_ids: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.params)
        for name in ("generators", "prompt_token_ids", "output_token_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SamplingBatch.{name} has {len(getattr(self, name))} rows, "
                                 f"params has {n}")
        if self.stop_ids and len(self.stop_ids) != n:
            raise ValueError(f"SamplingBatch.stop_ids has {len(self.stop_ids)} rows, params has {n}")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Stateless; ``sampler(logits, batch)`` picks one token per row."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(batch.params):
            raise ValueError(f"logits must be [B={len(batch.params)}, V], got {tuple(logits.shape)}")
        params = batch.params
        stop_ids = batch.stop_ids or None
        mask_rows = min_tokens_rows(params, batch.output_token_ids, stop_ids)
        penal_rows = [i for i, p in enumerate(params) if needs_penalties(p)]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not mask_rows and not penal_rows and not lp_rows and all(p.greedy for p in params):
            return SamplerOutput(argmax(logits).tolist(), [None] * len(params))

        raw = logits
        work = self._process(logits, batch, mask_rows, penal_rows)
        tokens = argmax(work)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sample_rows:
            idx = torch.tensor(sample_rows, device=work.device)
            sampled = _sample(work[idx], [params[i] for i in sample_rows],
                              [batch.generators[i] for i in sample_rows])
            tokens[idx] = sampled
        token_list = tokens.tolist()

        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        computed = compute_logprobs(raw, lp_rows, [token_list[i] for i in lp_rows],
                                    [params[i].logprobs for i in lp_rows])
        for i, lp in zip(lp_rows, computed):
            logprobs[i] = lp
        return SamplerOutput(token_list, logprobs)

    def target_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """float64 [B, V]: the distribution each row's token would be drawn from by ``__call__``.

        Stages 1-7 as for sampling; a greedy row gets the point mass at its
        argmax. Speculative verification (tierserve/engine/spec_decode) checks
        drafts against it.
        """
        params = batch.params
        mask_rows = min_tokens_rows(params, batch.output_token_ids, batch.stop_ids or None)
        penal_rows = [i for i, p in enumerate(params) if needs_penalties(p)]
        work = self._process(logits, batch, mask_rows, penal_rows)
        probs = torch.zeros(work.shape, dtype=torch.float64, device=work.device)
        probs.scatter_(1, work.argmax(dim=-1, keepdim=True), 1.0)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sample_rows:
            idx = torch.tensor(sample_rows, device=work.device)
            probs[idx] = _filtered_probs(work[idx], [params[i] for i in sample_rows])
        return probs

    @staticmethod
    def _process(logits: torch.Tensor, batch: SamplingBatch, mask_rows: list[int],
                 penal_rows: list[int]) -> torch.Tensor:
        """Stages 1-2: the min_tokens mask and the penalties, on an fp32 copy where they apply."""
        params = batch.params
        work = logits.float()
        if mask_rows:
            work = mask_stop_ids(work, mask_rows, batch.stop_ids)
        if penal_rows:
            idx = torch.tensor(penal_rows, device=work.device)
            work = work.clone()
            work[idx] = apply_penalties(
                work[idx], [params[i] for i in penal_rows],
                [batch.prompt_token_ids[i] for i in penal_rows],
                [batch.output_token_ids[i] for i in penal_rows])
        return work


def _sample(logits: torch.Tensor, params: list[SamplingParams],
            generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of penalised logits [R, V] (all rows non-greedy)."""
    dev = logits.device
    probs = _filtered_probs(logits, params)
    cdf = torch.cumsum(probs, dim=-1)

    u = torch.empty(len(params), dtype=torch.float64, device=dev)
    default_rows = [i for i, g in enumerate(generators) if g is None]
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, dtype=torch.float64)[0]
    if default_rows:
        u[torch.tensor(default_rows, device=dev)] = torch.rand(len(default_rows), dtype=torch.float64).to(dev)
    # First index whose cdf exceeds u * total: zero-probability tokens have
    # empty intervals and are never chosen; u < 1 keeps the index in range.
    target = (u * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp(max=logits.shape[1] - 1)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Stages 3-7 for non-greedy rows: temperature, truncation, softmax (float64) [R, V]."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    scaled = logits / temps.unsqueeze(1)
    trunc_rows = [i for i, p in enumerate(params) if needs_truncation(p)]
    if trunc_rows:
        idx = torch.tensor(trunc_rows, device=dev)
        keep = truncation_mask(scaled[idx], [params[i] for i in trunc_rows])
        scaled[idx] = scaled[idx].masked_fill(~keep, float("-inf"))
    return torch.softmax(scaled.double(), dim=-1)
