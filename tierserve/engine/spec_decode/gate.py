"""Draft back-off: a request whose drafts keep failing stops proposing for a while (no torch).

Verifying ``k`` drafts costs a forward over ``1 + k`` positions instead of
one; on a memory-bound batch-1 step that is cheap but not free (a few to
tens of percent on CPU). Where the proposer finds matches that the target
keeps rejecting (free text sampled at a high temperature, output that does
not quote its context), every verification pays that cost and yields one
token, so speculation would run slower than plain decoding. The gate bounds
that loss.

Rule, per request:

* a verification that accepts at least one draft resets the gate;
* after ``patience`` consecutive verifications that accept nothing, the
  request proposes nothing for the next ``pause`` steps, ``pause`` starting
  at ``first_pause`` and doubling on each further miss up to ``max_pause``;
* after a pause, one verification probes again: a miss pauses at once
  (doubled), a hit resets.

So a request that never accepts spends at most one verifying step per
``max_pause + 1`` steps once the pause has grown (defaults 4, 2, 32: about
3% of its steps after the first ~10 verifications), while a request whose
drafts hold never pauses.

Off by default (``draft_backoff``): measured on SmolLM2 at batch 1 on a
2-core CPU (benchmarks/speculative.py), verifying 1 + 4 positions costs about
as much as one (the step is bound by reading the weights), so failing drafts
cost nothing there (sampled text at temperature 1.5: ngram 1.02-1.10x plain)
while pausing forfeits hits (a quote with many one-off misses: 1.27x with
back-off at patience 2 against 1.65x without). It is meant for steps where
verification is not free: large batches, compute-bound devices. Proposals that are empty (the proposer found no
match) are not verifications and leave the gate as it is. The gate decides
only whether to *propose*; what is generated never depends on it.

Tests: tests/test_spec_gate.py (exact step sequences).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DraftGate:
    patience: int = 4
    first_pause: int = 2
    max_pause: int = 32
    misses: int = 0   # consecutive verifications that accepted nothing
    pause: int = 0    # length of the last pause (0: not backing off)
    skip: int = 0     # steps still to skip

    def allow(self) -> bool:
        """Whether this step may propose; a skipped step counts down the pause."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def record(self, num_accepted: int) -> None:
        """The outcome of one verification of this request's drafts."""
        if num_accepted > 0:
            self.misses = self.pause = 0
            return
        self.misses += 1
        if self.pause > 0 or self.misses >= self.patience:
            self.pause = min(self.max_pause, 2 * self.pause if self.pause else self.first_pause)
            self.skip = self.pause
            self.misses = 0
