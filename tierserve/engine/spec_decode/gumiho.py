"""Gumiho proposer: chain drafts from trained draft heads fed the target's hidden states.

The heads (gumiho_heads.py: a serial transformer head for the first
``serial_depth`` drafts, parallel MLP heads for the rest) run on the pairs
``(h_p, x_{p+1})`` of the request's last ``window`` positions, where ``h_p`` is
the target's final hidden state at position ``p``. The engine hands the
proposer those states after every forward (``observe``: the rows of the
positions whose KV was kept, i.e. prompt tokens and accepted drafts), and the
proposer keeps, per request, a window of the last ``window`` pairs
(``_Window``, a position-indexed buffer: observing a position again, after a
rollback or a preemption's recompute, overwrites it and drops what follows).

Drafting a tree (``draft_tree_width`` > 1): ``propose_tree``, see gumiho_tree.py.

Drafting a chain (top-1 per position, the linear verifier checks it):
``propose`` runs the serial head on the window for ``d_1``, appends
``(z, d_1)`` and runs it again, ``serial_depth`` times at most, then every MLP
head at once on ``(z, d_last)`` for the drafts after. Token embeddings and
logits come from the target's own (frozen) embedding and LM head; the logits
cover the heads' draft vocabulary only (``draft_vocab``). No proposal (an empty
list) while the window does not end at the request's newest token (positions
not seen by the target in this engine: a prefix-cache hit covering the whole
prompt leaves the window short until the next forward, but never stale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tierserve.engine.spec_decode.gumiho_heads import GumihoHeads
from tierserve.engine.spec_decode.gumiho_tree import draft_tree
from tierserve.engine.spec_decode.proposer import Proposer
from tierserve.engine.spec_decode.tree import DraftTree


@dataclass
class _Window:
    """The last pairs of one request: ``hidden[i]`` at position ``end - len + i``, followed by ``tokens[i]``."""

    hidden: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    end: int = 0  # one past the newest stored position

    def put(self, first_pos: int, hidden: torch.Tensor, tokens: list[int], limit: int) -> None:
        start = self.end - len(self.tokens)
        if self.hidden is None or not start <= first_pos <= self.end:
            self.hidden, self.tokens = hidden[-limit:], tokens[-limit:]
        else:
            keep = first_pos - start
            self.hidden = torch.cat([self.hidden[:keep], hidden])[-limit:]
            self.tokens = (self.tokens[:keep] + tokens)[-limit:]
        self.end = first_pos + len(tokens)


class GumihoProposer(Proposer):
    name = "gumiho"
    needs_hidden = True

    def __init__(self, heads: GumihoHeads, model: torch.nn.Module):
        self.heads = heads
        self.cfg = heads.config
        self.model = model
        dev = model.embed_tokens.weight.device
        self.heads.to(dev)
        self.vocab = heads.draft_vocab.to(dev)
        try:  # the draft vocabulary's rows of the LM head; a packed head computes all logits instead
            self.lm_head: torch.Tensor | None = model.head_weight().detach()[self.vocab].float()
        except AttributeError:
            self.lm_head = None
        self.windows: dict[str, _Window] = {}

    @classmethod
    def from_config(cls, config, model=None) -> GumihoProposer:
        if model is None:
            raise ValueError("the gumiho proposer needs the target model")
        heads = GumihoHeads.load(config.model, model.cfg.hidden_size, model.cfg.vocab_size)
        return cls(heads, model)

    # ------------------------------------------------------------- hidden states
    def observe(self, request_id: str, first_pos: int, hidden: torch.Tensor, next_tokens: list[int]) -> None:
        if not next_tokens:
            return
        w = self.windows.setdefault(request_id, _Window())
        w.put(first_pos, hidden.detach().float(), list(next_tokens), self.cfg.window)

    def forget(self, request_id: str) -> None:
        self.windows.pop(request_id, None)

    # ------------------------------------------------------------------ drafts
    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.vocab.device)).float()

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, draft_vocab] logits of the heads' features [N, H] over the draft vocabulary."""
        if self.lm_head is None:
            return self.model.compute_logits(feats.to(self.model.dtype))[:, self.vocab].float()
        return feats @ self.lm_head.T

    def _top1(self, feats: torch.Tensor) -> list[int]:
        return self.vocab[self._logits(feats).argmax(dim=-1)].tolist()

    def log_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, draft_vocab] draft log-probabilities (indices into ``self.vocab``)."""
        return torch.log_softmax(self._logits(feats), dim=-1)

    @torch.inference_mode()
    def propose_tree(self, token_ids: Sequence[int], depth: int, width: int, budget: int,
                     request_id: str | None = None) -> DraftTree:
        """A draft tree of at most ``budget`` nodes and ``depth`` levels (gumiho_tree.py); empty like ``propose``."""
        w = self.windows.get(request_id)
        if w is None or w.end != len(token_ids) - 1 or depth < 1 or budget < 1:
            return DraftTree((), ())
        pairs = self.heads.pairs(w.hidden, self._embed(w.tokens))
        return draft_tree(self, pairs, depth, width, budget)

    @torch.inference_mode()
    def propose(self, token_ids: Sequence[int], num_tokens: int, request_id: str | None = None) -> list[int]:
        w = self.windows.get(request_id)
        if w is None or w.end != len(token_ids) - 1 or num_tokens < 1:
            return []
        heads = self.heads
        pairs = heads.pairs(w.hidden, self._embed(w.tokens))
        drafts: list[int] = []
        z = None
        for _ in range(min(num_tokens, self.cfg.serial_depth)):
            z = heads.serial_forward(pairs[None])[0, -1]
            drafts.extend(self._top1(z[None]))
            pairs = torch.cat([pairs, heads.pairs(z[None], self._embed(drafts[-1:]))])[-self.cfg.window:]
        more = min(num_tokens - len(drafts), self.cfg.num_mlp_heads)
        if more > 0 and z is not None:
            feats = heads.mlp_forward(z[None], self._embed(drafts[-1:]))[:more]
            drafts.extend(self._top1(torch.cat(feats)))
        return drafts
