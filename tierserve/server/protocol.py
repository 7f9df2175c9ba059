"""OpenAI wire format (pydantic): requests and responses of /v1/completions and /v1/chat/completions.

Requests accept the OpenAI fields plus vLLM-style sampling extensions
(``top_k``, ``min_p``, ``top_h``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
``include_stop_str_in_output``) and ``return_token_ids`` (the response then
carries ``prompt_token_ids`` and each choice its ``token_ids``). Unknown
fields are ignored, as OpenAI and vLLM do.

Limits the server enforces here (each raises InvalidParameterError naming the
field, which the HTTP layer turns into a 400 with ``param``): ``n`` and
``best_of`` must be 1; ``echo``, ``suffix``, ``logit_bias``, ``tools`` and a
non-text ``response_format`` are not supported; a completions ``prompt`` is
one string or one list of token ids (a batch of one is unwrapped); chat
message content is a string or a list of ``{"type": "text"}`` parts.
``max_tokens`` defaults to 16 for completions (OpenAI's default) and, for
chat, to whatever fits in the context (``max_model_len - prompt tokens``).
Everything else (ranges of temperature, top_p, ...) is checked by
``SamplingParams``. A chat ``max_tokens`` sent beside ``max_completion_tokens``
is unused but still held to ``[1, max_model_len - 1]``.

Fields take only the JSON types their schema names (server/json_types.py: no
``"5"`` or ``true`` for an integer, no ``0`` for a boolean). The OpenAPI schema
states each bound (``_doc``), the rules between fields that JSON Schema can say
as ``if``/``then`` (``top_logprobs`` needs ``logprobs``, ``stream_options`` needs
``stream``), and, per running server, the context bounds of
server/openapi_limits.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from tierserve.errors import InvalidParameterError
from tierserve.sampling_params import SamplingParams
from tierserve.server.json_types import JsonBool, JsonFloat, JsonInt

#: OpenAI's default ``max_tokens`` for legacy completions.
COMPLETION_DEFAULT_MAX_TOKENS = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: JsonBool = False


def _doc(default: Any, **schema: Any) -> Any:
    """A field whose OpenAPI schema states a bound the server enforces (with a 400 naming the field:
    ``_check_common``, ``to_sampling_params``, SamplingParams) without pydantic enforcing it."""
    return Field(default, json_schema_extra=schema)


_UNIT = {"minimum": 0.0, "maximum": 1.0}
_PENALTY = {"minimum": -2.0, "maximum": 2.0}
_LOGPROBS = {"minimum": 0, "maximum": 20}


def _requires(field: str, field_type: str, other: str) -> dict:
    """JSON Schema: when ``field`` is sent as a ``field_type``, ``other`` must be ``true``."""
    return {"if": {"required": [field], "properties": {field: {"type": field_type}}},
            "then": {"required": [other], "properties": {other: {"const": True}}}}


#: Rules between fields that the server enforces (400 naming the first field) and JSON Schema can state.
_STREAM_RULE = _requires("stream_options", "object", "stream")
_TOP_LOGPROBS_RULE = _requires("top_logprobs", "integer", "logprobs")


class _SamplingFields(_Request):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_RULE]})
    model: str | None = None
    max_tokens: JsonInt | None = _doc(None, minimum=1)
    temperature: JsonFloat | None = _doc(None, minimum=0.0)
    top_p: JsonFloat | None = _doc(None, exclusiveMinimum=0.0, maximum=1.0)
    n: JsonInt = _doc(1, minimum=1, maximum=1)
    stream: JsonBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = _doc(None, minLength=1, items={"type": "string", "minLength": 1})
    seed: JsonInt | None = None
    presence_penalty: JsonFloat = _doc(0.0, **_PENALTY)
    frequency_penalty: JsonFloat = _doc(0.0, **_PENALTY)
    logit_bias: dict[str, float] | None = _doc(None, maxProperties=0)
    user: str | None = None
    # vLLM-style extensions
    top_k: JsonInt = 0
    min_p: JsonFloat = _doc(0.0, **_UNIT)
    top_h: JsonFloat = _doc(0.0, **_UNIT)
    repetition_penalty: JsonFloat = _doc(1.0, exclusiveMinimum=0.0)
    min_tokens: JsonInt = _doc(0, minimum=0)
    ignore_eos: JsonBool = False
    stop_token_ids: list[JsonInt] | None = None
    skip_special_tokens: JsonBool = True
    include_stop_str_in_output: JsonBool = False
    return_token_ids: JsonBool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.n != 1:
            raise InvalidParameterError("n", f"only n=1 is supported, got {self.n}")
        if self.logit_bias:
            raise InvalidParameterError("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidParameterError("stream_options", "is only allowed when stream is true")

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k, min_p=self.min_p, top_h=self.top_h, seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, min_tokens=self.min_tokens)


_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
#: The prompt's OpenAPI schema: the constraints the server enforces (``prompt_input``, and the engine's
#: vocabulary check for token ids), all answered with 400 naming ``prompt``.
PROMPT_SCHEMA = {"anyOf": [_TEXT, _TOKEN_IDS,
                           {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1},
                           {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1}]}


class CompletionRequest(_SamplingFields):
    prompt: Annotated[str | list[JsonInt] | list[str] | list[list[JsonInt]], WithJsonSchema(PROMPT_SCHEMA)]
    logprobs: JsonInt | None = _doc(None, **_LOGPROBS)
    echo: JsonBool = _doc(False, enum=[False])
    suffix: str | None = _doc(None, maxLength=0)
    best_of: JsonInt | None = _doc(None, minimum=1, maximum=1)

    def prompt_input(self) -> str | list[int]:
        """The one prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidParameterError("prompt", f"only one prompt per request is supported, got {len(p)}")
            p = p[0]
        if not p:
            raise InvalidParameterError("prompt", "must not be empty")
        return p

    def to_sampling_params(self, max_model_len: int, num_prompt_tokens: int) -> SamplingParams:
        self._check_common()
        if self.best_of not in (None, 1):
            raise InvalidParameterError("best_of", f"only best_of=1 is supported, got {self.best_of}")
        if self.echo:
            raise InvalidParameterError("echo", "is not supported")
        if self.suffix:
            raise InvalidParameterError("suffix", "is not supported")
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        check_context(num_prompt_tokens, max_tokens, max_model_len, "prompt")
        return self._params(max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_RULE, _TOP_LOGPROBS_RULE]})

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: JsonInt | None = _doc(None, minimum=1)
    logprobs: JsonBool = False
    top_logprobs: JsonInt | None = _doc(None, **_LOGPROBS)
    tools: list[dict[str, Any]] | None = _doc(None, maxItems=0)
    tool_choice: Any = None
    response_format: dict[str, Any] | None = _doc(None, properties={"type": {"enum": ["text"]}})
    add_generation_prompt: JsonBool = True

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

    def to_sampling_params(self, max_model_len: int, num_prompt_tokens: int) -> SamplingParams:
        self._check_common()
        if self.tools:
            raise InvalidParameterError("tools", "tool calling is not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidParameterError("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameterError("top_logprobs", "requires logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:  # SamplingParams would say logprobs
            raise InvalidParameterError("top_logprobs", f"must be in [0, 20], got {self.top_logprobs}")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:  # name the field the client sent
            raise InvalidParameterError(field, f"must be an integer >= 1, got {max_tokens}")
        if field == "max_completion_tokens" and self.max_tokens is not None \
                and not 1 <= self.max_tokens < max_model_len:  # unused then, but held to its documented range
            raise InvalidParameterError("max_tokens", f"must be in [1, {max_model_len - 1}], got {self.max_tokens}")
        if max_tokens is None:
            check_context(num_prompt_tokens, 0, max_model_len, "messages")
            max_tokens = max_model_len - num_prompt_tokens
        else:
            check_context(num_prompt_tokens, max_tokens, max_model_len, "messages", field)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs)


class ContextOverflowError(InvalidParameterError):
    """Prompt plus max_tokens exceed the model's context; the message names both numbers."""

    def __init__(self, field: str, num_prompt_tokens: int, max_tokens: int, max_model_len: int):
        if num_prompt_tokens >= max_model_len:
            msg = (f"this model's maximum context length is {max_model_len} tokens, "
                   f"but the prompt has {num_prompt_tokens} tokens")
        else:
            msg = (f"this model's maximum context length is {max_model_len} tokens, but "
                   f"{num_prompt_tokens + max_tokens} tokens were requested ({num_prompt_tokens} "
                   f"in the prompt, {max_tokens} for the completion)")
        super().__init__(field, msg)
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int,
                  prompt_field: str, max_tokens_field: str = "max_tokens") -> None:
    """Raise ContextOverflowError unless the prompt leaves room for ``max_tokens`` (>= 1) tokens."""
    if num_prompt_tokens >= max_model_len:
        raise ContextOverflowError(prompt_field, num_prompt_tokens, max_tokens, max_model_len)
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise ContextOverflowError(max_tokens_field, num_prompt_tokens, max_tokens, max_model_len)


# ------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tierserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
