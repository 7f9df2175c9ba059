"""What one schedule() call decided: the dataclasses the model runner and the step hooks consume (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step.

    The runner computes tokens ``[start, start + num_tokens)`` of the request
    (prompt + outputs). ``start`` is the number of tokens whose KV already
    exists, prefix-cache hits included. ``new_block_ids`` are the blocks
    appended to the request's block table this step (prefix-hit blocks first).
    ``resumed`` marks the first step after admission or after a preemption:
    the runner drops any state it kept for the request and rebuilds its block
    table from ``new_block_ids``. The request samples a token this step iff
    ``start + num_tokens`` equals its token count at schedule time.

    ``spec_token_ids`` (speculative decoding): draft tokens verified this
    step. They follow the request's known tokens and are counted in
    ``num_tokens``: the runner computes the last known token and the drafts
    (``1 + len(spec_token_ids)`` tokens, their KV included) and returns
    logits for all of them; the engine then rolls the rejected drafts back.
    """

    request_id: str
    start: int
    num_tokens: int
    new_block_ids: tuple[int, ...]
    resumed: bool
    spec_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SchedulerOutput:
    """Requests to run (running ones in running order, then newly admitted), the ids preempted
    this step (their blocks are already freed), and the step's total token count."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
