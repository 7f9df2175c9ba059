"""SpecDecoder: the engine's speculative-decoding part: proposals per request, verification, counters.

After a request samples and does not finish, the engine asks ``propose``
for drafts for its next step; the scheduler budgets ``1 + len(drafts)``
tokens for it (tierserve/engine/scheduler.py) and the runner returns logits
for all those positions; ``verify`` turns them into emitted tokens
(verifier.py) and counts them (stats.py).

Limits: at most ``num_speculative_tokens`` drafts, and never more than can be
emitted: ``max_tokens - outputs - 1`` (a verification emits up to one token
more than its drafts) and ``max_model_len - 1 - tokens`` (a step never
computes a position the context cannot hold). So the KV a request may need
never exceeds what ``Scheduler.add_request`` checked against the pool
(prompt + max_tokens - 1 tokens). With ``speculative == "none"`` nothing is
ever proposed and the engine runs exactly as without this part.

Hidden states (a proposer with ``needs_hidden``, the gumiho heads): the
runner then returns the final hidden state of every token of the step
(``RunnerOutput.hidden``, rows in scheduling order); ``begin_step`` keeps
them and hands a prefill chunk that does not sample its rows at once, and
``propose`` first hands the sampling request the rows of the positions that
kept their KV (``start .. num_tokens - 2`` after the verification's rollback:
the last known token and the accepted drafts), each with the token that
follows it.

Back-off (``draft_backoff``, off by default): each request carries a
``DraftGate`` (gate.py) that pauses its proposals after verifications that
accept nothing, so a request whose drafts fail runs (almost) as plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tierserve.engine.request import Request
from tierserve.engine.sampler import Sampler
from tierserve.engine.spec_decode.gate import DraftGate
from tierserve.engine.spec_decode.registry import build_proposer
from tierserve.engine.spec_decode.stats import SpecDecodeCounters, SpecDecodeStats
from tierserve.engine.spec_decode.verifier import Verified, verify_request


class SpecDecoder:
    def __init__(self, config, max_model_len: int, model=None):
        """``config``: a ``SpeculativeConfig`` (tierserve/config.py); ``model``: the target."""
        self.proposer = build_proposer(config, model)
        self.needs_hidden = self.proposer is not None and self.proposer.needs_hidden
        self._rows: dict[str, tuple[int, int, int]] = {}  # request -> (first row, first position, tokens)
        self._hidden: torch.Tensor | None = None
        self.num_speculative_tokens = config.num_speculative_tokens if self.proposer is not None else 0
        self.max_model_len = max_model_len
        self.backoff = config.draft_backoff
        self.counters = SpecDecodeCounters(config.method, self.num_speculative_tokens)

    def begin_step(self, sched, hidden: torch.Tensor | None, requests: dict[str, Request]) -> None:
        """Keep the step's hidden states (``needs_hidden`` only); hand over the rows of non-sampling chunks."""
        if not self.needs_hidden or hidden is None:
            return
        self._hidden, self._rows, row = hidden, {}, 0
        for sr in sched.scheduled:
            req = requests[sr.request_id]
            n = sr.num_tokens - len(sr.spec_token_ids)
            if sr.start + n < req.num_tokens:  # a prefill chunk: every next token is known
                self.proposer.observe(sr.request_id, sr.start, hidden[row:row + n],
                                      req.token_ids(sr.start + 1, sr.start + n + 1))
            else:
                self._rows[sr.request_id] = (row, sr.start, sr.num_tokens)
            row += sr.num_tokens

    def _observe_sampled(self, req: Request) -> None:
        got = self._rows.pop(req.request_id, None)
        if got is None:
            return
        row, start, n = got
        n = min(n, req.num_tokens - 1 - start)  # positions whose KV was kept
        if n > 0:
            self.proposer.observe(req.request_id, start, self._hidden[row:row + n],
                                  req.token_ids(start + 1, start + n + 1))

    def forget(self, request_id: str) -> None:
        if self.proposer is not None:
            self.proposer.forget(request_id)

    def propose(self, req: Request) -> list[int]:
        """Drafts for ``req``'s next step (empty when off, when nothing matches or nothing more fits)."""
        if self.proposer is None:
            return []
        if self.needs_hidden:
            self._observe_sampled(req)
        k = min(self.num_speculative_tokens, req.params.max_tokens - len(req.output_token_ids) - 1,
                self.max_model_len - 1 - req.num_tokens)
        if k < 1:
            return []
        if self.backoff:
            if req.spec_gate is None:
                req.spec_gate = DraftGate()
            if not req.spec_gate.allow():
                return []
        return self.proposer.propose(req.token_ids(), k, req.request_id)[:k]

    def verify(self, sampler: Sampler, logits: torch.Tensor, drafts: Sequence[int], req: Request,
               generator: torch.Generator | None, stop_ids: set[int]) -> Verified:
        """The tokens ``req`` emits for its verified ``drafts`` (verifier.py), counted in the stats."""
        out = verify_request(sampler, logits, drafts, req.params, generator, req.prompt_token_ids,
                             req.output_token_ids, stop_ids)
        self.counters.record(len(drafts), out.num_accepted)
        if req.spec_gate is not None:
            req.spec_gate.record(out.num_accepted)
        return out

    def stats(self) -> SpecDecodeStats:
        return self.counters.snapshot()
