"""What the engine hands back per request per step, and the final result."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.engine.sampler import TokenLogprobs


@dataclass
class RequestOutput:
    """One step's news for one request: new tokens and text, and whether it finished.

    ``finish_reason`` is "stop" (eos, a stop token or a stop string), "length"
    (max_tokens or max_model_len) or "abort"; None while running.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class CompletionOutput:
    """A finished generation (the offline ``LLM.generate`` result)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None
    num_cached_tokens: int = 0
