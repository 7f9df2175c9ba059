"""Speculative-decoding counters: drafts proposed and accepted (no torch).

``num_drafts``: verifications (a request's drafts checked in one step);
``num_draft_tokens``: draft tokens verified (a draft tree's nodes, of which
at most one per depth can be accepted); ``num_accepted_tokens``: drafts
accepted; ``accepted_per_position[i]``: verifications whose draft ``i`` (a
tree's node at depth ``i + 1``) was accepted (so position 0 counts every verification with at least one accepted
draft). A verification emits ``accepted + 1`` tokens, so the mean accepted
length (tokens per verifying step of a request) is
``1 + num_accepted_tokens / num_drafts``. A draft counts as accepted by the
verifier's rule even when a stop rule ends the request before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpecDecodeStats:
    """Totals since the engine started; ``method`` "none" when speculation is off (all zeros)."""

    method: str
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def plus(self, other: SpecDecodeStats) -> SpecDecodeStats:
        """The sum of two replicas' totals (per-position counts added position by position).

        The method and draft length are kept when both agree; replicas that
        disagree (a rolling update) sum as method "mixed" and the larger length.
        """
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pos = tuple((self.accepted_per_position[i] if i < len(self.accepted_per_position) else 0)
                    + (other.accepted_per_position[i] if i < len(other.accepted_per_position) else 0)
                    for i in range(n))
        method = self.method if self.method == other.method else "mixed"
        return SpecDecodeStats(method, max(self.num_speculative_tokens, other.num_speculative_tokens),
                               self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                               self.num_accepted_tokens + other.num_accepted_tokens, pos)


@dataclass
class SpecDecodeCounters:
    """The engine's running counts, snapshotted as ``SpecDecodeStats``."""

    method: str
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    per_position: list[int] = field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.per_position) < num_accepted:
            self.per_position.extend([0] * (num_accepted - len(self.per_position)))
        for i in range(num_accepted):
            self.per_position[i] += 1

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.method, self.num_speculative_tokens, self.num_drafts, self.num_draft_tokens,
                               self.num_accepted_tokens, tuple(self.per_position))
