"""Per-token logprobs returned to the user.

Choice: logprobs are of the *raw* model distribution, ``log_softmax(logits)``
of the logits the model produced, before min_tokens masking, penalties,
temperature and truncation (vLLM v1's default ``raw_logprobs``; also what the
OpenAI API reports). So the sampled token's logprob may be that of a token the
filters made far more likely, and it is never -inf unless the model itself
said so.

``rank`` of the sampled token is 1 + the number of tokens with a strictly
larger logprob (1 = most likely; tied tokens share a rank). ``top`` lists the
``n = params.logprobs`` most likely tokens, descending (``torch.topk``; the
order among exactly equal logprobs is topk's);
``n = 0`` gives an empty list but still the sampled token's logprob and rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and rank, and the top-n alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def compute_logprobs(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int],
                     num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Logprobs for ``rows`` of ``logits`` [B, V] (raw model logits).

    ``token_ids[j]`` is the token sampled for ``rows[j]`` and ``num_top[j]``
    how many alternatives that row asked for.
    """
    if not rows:
        return []
    idx = torch.as_tensor(list(rows), dtype=torch.int64, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    tok = torch.as_tensor(list(token_ids), dtype=torch.int64, device=logits.device).unsqueeze(1)
    chosen = logp.gather(1, tok)
    ranks = (logp > chosen).sum(dim=-1) + 1
    max_top = min(max(num_top), logp.shape[-1])
    top_vals = top_ids = None
    if max_top > 0:
        top_vals, top_ids = torch.topk(logp, max_top, dim=-1, sorted=True)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
    out = []
    for j, n in enumerate(num_top):
        top = [] if top_ids is None else list(zip(top_ids[j][:n], top_vals[j][:n]))
        out.append(TokenLogprobs(int(token_ids[j]), chosen_l[j], int(ranks_l[j]), top))
    return out
