"""Request: one generation's token state, as the scheduler sees it (no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tierserve.engine.spec_decode.gate import DraftGate
from tierserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """Prompt plus generated tokens; ``num_computed_tokens`` have KV in the cache.

    ``block_ids`` is the request's block table (owned by the KV cache manager).
    ``num_cached_tokens`` is how many prompt tokens were served from the
    prefix cache at admission (for metrics). ``arrival`` orders FCFS.
    ``spec_token_ids``: speculative drafts for the next step; they are not
    part of ``num_tokens`` until verified and appended.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    #: drafts proposed for the next step (speculative decoding); the scheduler decides whether to verify them
    spec_token_ids: list[int] = field(default_factory=list)
    #: the request's draft back-off (speculative decoding with ``draft_backoff``; None until its first proposal)
    spec_gate: DraftGate | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Slice of prompt + output tokens without building the whole list."""
        n = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else end
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
