"""Build OpenAI responses and stream chunks from the engine's ``RequestOutput`` diffs.

``Accumulator`` folds a request's diffs into the final text, token ids,
logprobs, finish reason and usage. The ``*_chunk`` functions turn one diff
into one SSE chunk. Token strings in logprobs are ``tokenizer.decode([id])``
of each token (vLLM's convention); ``text_offset`` is the running length of
those strings. Usage counts prompt tokens, generated tokens and, in
``prompt_tokens_details.cached_tokens``, prompt tokens served from the
prefix cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import BaseModel

from tierserve.engine.outputs import RequestOutput
from tierserve.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)


@dataclass
class Accumulator:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason

    def usage(self) -> Usage:
        return make_usage(self.num_prompt_tokens, len(self.token_ids), self.num_cached_tokens)


def make_usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def completion_logprobs(tokenizer, logprobs: list, offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in logprobs:
        token = tokenizer.decode([lp.token_id])
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({tokenizer.decode([t]): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(tokenizer, logprobs: list) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        token = tokenizer.decode([lp.token_id])
        top = [TopLogprob(token=(s := tokenizer.decode([t])), logprob=v, bytes=list(s.encode()))
               for t, v in lp.top]
        content.append(ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


def sse(payload: BaseModel | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (``data: [DONE]`` for the terminator)."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n".encode()
    return b"data: " + json.dumps(payload.model_dump(exclude_none=True)).encode() + b"\n\n"


def sse_error(body: dict) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"
