"""Verification of one request's drafts: logits rows of the verified positions -> the tokens it emits.

A request that had drafts ``d_0 .. d_{k-1}`` verified this step has k + 1
logits rows: row ``j`` is the model's prediction after the request's tokens
followed by ``d_0 .. d_{j-1}``. For ``j = 0, 1, ...``:

* the target distribution ``p_j`` is the sampler's (tierserve/engine/sampler.py
  ``Sampler.target_probs``) with the outputs so far extended by the
  ``j`` accepted drafts, so min_tokens, penalties, temperature and truncation
  apply exactly as if the drafts had been sampled one step at a time;
* greedy: accept ``d_j`` iff it equals ``argmax p_j``, else emit the argmax
  and stop; sampling: ``rejection.point_mass_verify`` (accept with probability
  ``p_j(d_j)``, else emit a draw from ``p_j`` without ``d_j``) and stop at the
  first rejection;
* all k accepted: the bonus token is sampled from row k by the sampler itself.

So the request emits ``a + 1`` tokens for ``a`` accepted drafts. Greedy
requests without penalties, logprobs or an active min_tokens mask take one
batched argmax over the rows (the common case); the others run the sampler
per position. Logprobs, when asked for, are of each emitted token's raw row.
Stop rules are applied by the engine while it appends the tokens, so a stop
token or stop string among them ends the request there.

Tests: tests/test_spec_verifier.py (exact on constructed logits: accepted
prefix, correction, bonus, penalties between positions) and the engine tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tierserve.engine.logprobs import TokenLogprobs, compute_logprobs
from tierserve.engine.penalties import needs_penalties
from tierserve.engine.sampler import Sampler, SamplingBatch
from tierserve.engine.spec_decode.rejection import point_mass_verify
from tierserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Verified:
    """What one request emits: the accepted drafts then one corrected or bonus token."""

    token_ids: list[int]
    num_accepted: int
    logprobs: list[TokenLogprobs | None]


def verify_request(sampler: Sampler, logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
                   generator: torch.Generator | None, prompt_token_ids: list[int],
                   output_token_ids: list[int], stop_ids: set[int]) -> Verified:
    """Verify ``drafts`` against ``logits`` [len(drafts) + 1, V] (see the module docstring)."""
    k = len(drafts)
    if logits.shape[0] != k + 1:
        raise ValueError(f"{k} drafts need {k + 1} logits rows, got {logits.shape[0]}")
    if (params.greedy and not needs_penalties(params) and params.logprobs is None
            and (params.min_tokens <= len(output_token_ids) or not stop_ids)):
        targets = logits.argmax(dim=-1).tolist()
        a = 0
        while a < k and drafts[a] == targets[a]:
            a += 1
        return Verified(list(drafts[:a]) + [targets[a]], a, [None] * (a + 1))
    emitted: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    for j in range(k + 1):
        row = logits[j:j + 1]
        batch = SamplingBatch([params], [generator], [prompt_token_ids], [output_token_ids + emitted],
                              [stop_ids])
        if j == k:
            out = sampler(row, batch)
            emitted.append(out.token_ids[0])
            logprobs.append(out.logprobs[0])
            return Verified(emitted, k, logprobs)
        p = sampler.target_probs(row, batch)[0]
        if params.greedy:
            token = int(p.argmax())
            accepted = token == drafts[j]
        else:
            token, accepted = point_mass_verify(p, drafts[j], generator)
        emitted.append(token)
        logprobs.append(compute_logprobs(row, [0], [token], [params.logprobs])[0]
                        if params.logprobs is not None else None)
        if not accepted:
            return Verified(emitted, j, logprobs)
    raise AssertionError("unreachable")
