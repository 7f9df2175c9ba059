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

Trees (``draft_tree_width`` > 1): ``propose`` asks the proposer for a
``DraftTree`` (tree.py) of depth at most the chain limit ``k`` above and at
most ``draft_tree_nodes`` (and ``max_model_len - 1 - tokens``) nodes, keeps it
and returns its flattened tokens as the drafts (a prefix of them, if the
scheduler trims, is a tree again). A step with a tree runs through
``execute`` -> tree_step.run_tree_step (tree masks, depth positions);
``verify`` walks the tree (tree_verifier.py), moves the accepted path's KV to
consecutive positions (tree_step.compact_kv) and the hidden rows handed to
the proposer are the root's and the accepted path's. A tree that is a chain
runs the chain path. Trees need plain KV pages and no sliding-window layer
(refused at ``attach``, naming ``draft_tree_width``).

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
from tierserve.engine.spec_decode.tree import DraftTree
from tierserve.engine.spec_decode.tree_step import compact_kv, run_tree_step
from tierserve.engine.spec_decode.tree_verifier import verify_tree
from tierserve.engine.spec_decode.verifier import Verified, verify_request
from tierserve.errors import InvalidParameterError


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
        self.tree_width = config.draft_tree_width if self.proposer is not None else 1
        self.tree_nodes = config.draft_tree_nodes
        self._trees: dict[str, DraftTree] = {}  # request -> its proposed tree (not a chain)
        self._paths: dict[str, list[int]] = {}  # request -> the accepted path of its last tree
        self.runner = None

    def attach(self, runner) -> None:
        """The engine's ModelRunner: hidden states when the proposer needs them; trees need plain pages."""
        self.runner = runner
        runner.keep_hidden = self.needs_hidden
        if self.tree_width == 1:
            return
        if not all(hasattr(kv, "k") and getattr(kv.k, "dim", lambda: 0)() == 4 for kv in runner.kv_caches):
            raise InvalidParameterError("draft_tree_width", f"draft trees (width {self.tree_width}) need plain KV "
                                                            "pages; use draft_tree_width=1 with kv_compression")
        cfg = getattr(runner.model, "cfg", None)
        sliding = [i for i in range(getattr(cfg, "num_hidden_layers", 0)) if cfg.is_sliding(i)]
        if sliding:
            raise InvalidParameterError("draft_tree_width", f"draft trees do not support sliding-window attention "
                                                            f"({len(sliding)} layers); use draft_tree_width=1")

    def execute(self, sched, requests: dict[str, Request]):
        """The step's forward: the runner's own, or with tree masks when a scheduled request verifies a tree."""
        if any(s.spec_token_ids and s.request_id in self._trees for s in sched.scheduled):
            return run_tree_step(self.runner, sched, requests, self._trees)
        return self.runner.execute(sched, requests)

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
        path = self._paths.pop(req.request_id, None)
        if n > 0:
            hidden = self._hidden[row:row + n] if path is None else \
                self._hidden[[row + r for r in [0] + [1 + i for i in path][:n - 1]]]
            self.proposer.observe(req.request_id, start, hidden, req.token_ids(start + 1, start + n + 1))

    def forget(self, request_id: str) -> None:
        self._trees.pop(request_id, None)
        self._paths.pop(request_id, None)
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
        if self.tree_width == 1:
            return self.proposer.propose(req.token_ids(), k, req.request_id)[:k]
        nodes = min(self.tree_nodes, self.max_model_len - 1 - req.num_tokens)
        tree = self.proposer.propose_tree(req.token_ids(), k, self.tree_width, nodes, req.request_id)
        if tree.is_chain:
            self._trees.pop(req.request_id, None)
        else:
            self._trees[req.request_id] = tree
        return list(tree.tokens)

    def verify(self, sampler: Sampler, logits: torch.Tensor, drafts: Sequence[int], req: Request,
               generator: torch.Generator | None, stop_ids: set[int]) -> Verified:
        """The tokens ``req`` emits for its verified ``drafts`` (verifier.py, or tree_verifier.py for a tree whose
        accepted path's KV is compacted here), counted in the stats."""
        tree = self._trees.pop(req.request_id, None)
        if tree is not None:
            tree = tree.prefix(len(drafts))
            got = verify_tree(sampler, logits, tree, req.params, generator, req.prompt_token_ids,
                              req.output_token_ids, stop_ids)
            root = req.num_tokens - 1
            compact_kv(self.runner.kv_caches, req.block_ids, self.runner.spec.block_size, root,
                       tree.compaction(got.path))
            self._paths[req.request_id] = got.path
            out = Verified(got.token_ids, got.num_accepted, got.logprobs)
        else:
            out = verify_request(sampler, logits, drafts, req.params, generator, req.prompt_token_ids,
                                 req.output_token_ids, stop_ids)
        self.counters.record(len(drafts), out.num_accepted)
        if req.spec_gate is not None:
            req.spec_gate.record(out.num_accepted)
        return out

    def stats(self) -> SpecDecodeStats:
        return self.counters.snapshot()
