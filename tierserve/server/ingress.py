"""``OpenAIIngress``: the FastAPI front door (a Serve ingress deployment).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``GET /metrics``.

One request: parse (pydantic; a bad body is a 400 naming the field) -> check
``model`` (404 unless it is the served name) -> tokenize in a thread
(completions: ``tokenizer.encode(prompt)``, exactly what ``LLM.generate``
does with a string; chat: the tokenizer's chat template rendered to text,
then encoded without adding special tokens again) -> build SamplingParams and
check the context (400 with both numbers) -> call
``LLMServer.generate`` through a streaming handle with the prompt's chained
block hashes (``routing_kwargs``) so the prefix-aware router can pick the
replica that caches the longest prefix -> wait for the first diff (so
errors raised by the worker -- 400, 429 -- still become HTTP status codes) ->
stream SSE chunks (``data: {json}``, a usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``) or collect one JSON
response. If the HTTP client goes away, the response generator is closed or
the handler cancelled; both cancel the worker stream, which aborts the
request in the engine. An error after streaming started is sent as a final
``data: {"error": ...}`` event (the OpenAI error body), followed by
``data: [DONE]``.

Replica death: a worker replica that dies while it holds a request raises
``ActorDiedError`` at the ingress (server/errors.py ``replica_lost``). Ray
Serve itself re-routes a request that no replica accepted yet (its rejection
protocol sees the dead replica and picks another); a request that a replica
had accepted but not answered yet (queued or prefilling in its engine) is
retried here, on whichever replica the router picks now: up to
``REPLICA_ATTEMPTS`` calls while waiting for the first diff (a streamed
request: no byte of it reached the client yet), and a non-streamed request,
whose client sees only the final JSON, starts over when its replica dies
midway (at most ``REPLICA_ATTEMPTS`` times). A stream that already sent events
ends with the in-band error event (503 ``replica_unavailable``); a request
whose attempts are spent gets that 503 with Retry-After.

Drain (``drain()``, called by ``tierserve serve`` on SIGTERM / Ctrl-C): from
then on every new /v1/completions or /v1/chat/completions request gets 503
(``service_unavailable_error``, code ``draining``, ``Retry-After``) while the
requests already admitted run to their end; ``in_flight()`` counts those
(a streamed one until its last event is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from tierserve.routing.serve_router import routing_kwargs
from tierserve.server.errors import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    error_responses,
    install_error_handlers,
    install_openapi,
    model_not_found,
    replica_lost,
    to_api_error,
)
from tierserve.server.metrics import DEFAULT_STALE_AFTER_S, get_or_create_metrics_board, render_prometheus
from tierserve.server.openapi_events import state_stream_events
from tierserve.server.openapi_limits import state_server_limits
from tierserve.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from tierserve.server.responses import (
    Accumulator,
    chat_logprobs,
    completion_logprobs,
    sse,
    sse_error,
)


logger = logging.getLogger(__name__)

#: Calls of one request when its worker replica dies before answering (module doc, "Replica death").
REPLICA_ATTEMPTS = 3


@dataclass(frozen=True)
class IngressSettings:
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retry_after_s: int = 1
    metrics_stale_after_s: float = DEFAULT_STALE_AFTER_S


@dataclass
class _Call:
    """One request on its way to a worker."""

    kind: str                      # "completion" | "chat"
    request: CompletionRequest | ChatCompletionRequest
    request_id: str
    prompt_ids: list[int]
    stream: AsyncIterator
    first: object


@serve.ingress()
class OpenAIIngress:
    async def __init__(self, worker, settings: IngressSettings = IngressSettings()):
        self.worker = worker
        self.settings = settings
        info = await worker.info.remote()
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.block_size = info.block_size
        self.vocab_size = info.vocab_size
        self.tokenizer = await worker.get_tokenizer.remote()
        self._app_name = serve.get_replica_context().app_name
        self._board = get_or_create_metrics_board(self._app_name)
        self._draining = False
        self._in_flight = 0

    # ----------------------------------------------------------------- drain
    async def drain(self) -> int:
        """Stop admitting (new requests get 503 with Retry-After); returns the requests still in flight."""
        self._draining = True
        return self._in_flight

    async def in_flight(self) -> int:
        """Requests admitted and not yet answered in full."""
        return self._in_flight

    def _admit(self) -> None:
        if self._draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable_error",
                           code="draining", headers={"Retry-After": str(self.settings.retry_after_s)})
        self._in_flight += 1

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self)

    # -------------------------------------------------------------- requests
    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name, self.model_name)

    def _encode_completion(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt_input()
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def _encode_chat(self, req: ChatCompletionRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(req.template_messages(), tokenize=False,
                                                  add_generation_prompt=req.add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def start(self, kind: str, req) -> _Call:
        """Validate, tokenize, call the worker and wait for its first diff (errors raise here).

        A replica that dies before the first diff is replaced by another call (module doc, "Replica death").
        """
        self._check_model(req.model)
        encode = self._encode_chat if kind == "chat" else self._encode_completion
        ids = await asyncio.to_thread(encode, req)
        params = req.to_sampling_params(self.max_model_len, len(ids))
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            stream = None
            try:
                stream = self.worker.options(stream=True).generate.remote(
                    ids, params, rid, sent_at=time.time(), **routing_kwargs(ids, self.block_size))
                first = await stream.__anext__()
            except BaseException as exc:
                if stream is not None:
                    _cancel(stream)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if attempt < REPLICA_ATTEMPTS and replica_lost(exc):
                    logger.warning("request %s: replica lost before its first token (%s); call %d of %d next",
                                   rid, type(exc).__name__, attempt + 1, REPLICA_ATTEMPTS)
                    continue
                raise to_api_error(exc, self.settings.retry_after_s) from None
            return _Call(kind, req, rid, ids, stream, first)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def outputs(self, call: _Call) -> AsyncIterator:
        """The first diff, then the rest; cancels the worker stream if left early."""
        finished = False
        try:
            yield call.first
            finished = call.first.finished
            while not finished:
                out = await call.stream.__anext__()
                finished = out.finished
                yield out
        finally:
            if not finished:
                _cancel(call.stream)

    async def collect(self, call: _Call):
        acc = Accumulator()
        async for out in self.outputs(call):
            acc.add(out)
        req = call.request
        ids = call.prompt_ids if req.return_token_ids else None
        tokens = acc.token_ids if req.return_token_ids else None
        if call.kind == "completion":
            lp = completion_logprobs(self.tokenizer, acc.logprobs) if req.logprobs is not None else None
            choice = CompletionChoice(text="".join(acc.text), logprobs=lp, finish_reason=acc.finish_reason,
                                      stop_reason=acc.stop_reason, token_ids=tokens)
            return CompletionResponse(id=call.request_id, created=now(), model=self.model_name,
                                      choices=[choice], usage=acc.usage(), prompt_token_ids=ids)
        lp = chat_logprobs(self.tokenizer, acc.logprobs) if req.logprobs else None
        choice = ChatChoice(message=ChatMessageOut(content="".join(acc.text)), logprobs=lp,
                            finish_reason=acc.finish_reason, stop_reason=acc.stop_reason, token_ids=tokens)
        return ChatCompletionResponse(id=call.request_id, created=now(), model=self.model_name,
                                      choices=[choice], usage=acc.usage(), prompt_token_ids=ids)

    async def sse_stream(self, call: _Call) -> AsyncIterator[bytes]:
        """The SSE events of ``call``; the request counts as in flight until they are all sent (or dropped)."""
        try:
            async with contextlib.aclosing(self._sse_events(call)) as events:
                async for event in events:
                    yield event
        finally:
            self._in_flight -= 1

    async def _sse_events(self, call: _Call) -> AsyncIterator[bytes]:
        req, created, chat = call.request, now(), call.kind == "chat"
        chunk_cls = ChatCompletionChunk if chat else CompletionChunk
        head = dict(id=call.request_id, created=created, model=self.model_name)
        acc = Accumulator()
        offset = 0
        try:
            if chat:
                yield sse(ChatCompletionChunk(**head, choices=[ChatStreamChoice(
                    delta=DeltaMessage(role="assistant", content=""))],
                    prompt_token_ids=call.prompt_ids if req.return_token_ids else None))
            async for out in self.outputs(call):
                acc.add(out)
                reason = out.finish_reason if out.finished else None
                tokens = out.new_token_ids if req.return_token_ids else None
                if chat:
                    lp = chat_logprobs(self.tokenizer, out.new_logprobs) if req.logprobs else None
                    choice = ChatStreamChoice(delta=DeltaMessage(content=out.new_text), logprobs=lp,
                                              finish_reason=reason, token_ids=tokens)
                else:
                    lp = None
                    if req.logprobs is not None:
                        lp = completion_logprobs(self.tokenizer, out.new_logprobs, offset)
                        offset += sum(len(t) for t in lp.tokens)
                    choice = CompletionChoice(text=out.new_text, logprobs=lp, finish_reason=reason,
                                              token_ids=tokens)
                if out.new_text or out.finished or lp is not None or tokens:
                    yield sse(chunk_cls(**head, choices=[choice]))
            if req.include_usage:
                yield sse(chunk_cls(**head, choices=[], usage=acc.usage()))
        except Exception as exc:  # the status line is already sent: report in-band
            yield sse_error(to_api_error(exc, self.settings.retry_after_s).body())
        yield sse("[DONE]")

    async def respond(self, kind: str, req):
        self._admit()
        streaming = False
        try:
            if req.stream:
                call = await self.start(kind, req)
                streaming = True  # sse_stream counts it out when its last event is sent
                return StreamingResponse(self.sse_stream(call), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse((await self._collect_retrying(kind, req)).model_dump(exclude_none=True))
        finally:
            if not streaming:
                self._in_flight -= 1

    async def _collect_retrying(self, kind: str, req):
        """A whole non-streamed answer; a replica lost midway is replaced (module doc, "Replica death")."""
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            call = await self.start(kind, req)
            try:
                return await self.collect(call)
            except Exception as exc:
                if attempt < REPLICA_ATTEMPTS and replica_lost(exc):
                    logger.warning("request %s: replica lost midway (%s); call %d of %d next",
                                   call.request_id, type(exc).__name__, attempt + 1, REPLICA_ATTEMPTS)
                    continue
                raise to_api_error(exc, self.settings.retry_after_s) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def metrics(self) -> bytes:
        """The Prometheus text of the board's snapshots; a dead board is looked up again (recreated empty,
        refilled by the replicas' next pushes, server/worker.py ``push_metrics``)."""
        try:
            snapshots = await self._board.collect.remote(self.settings.metrics_stale_after_s)
        except Exception as exc:
            if not replica_lost(exc):
                raise
            self._board = await asyncio.to_thread(get_or_create_metrics_board, self._app_name)
            snapshots = await self._board.collect.remote(self.settings.metrics_stale_after_s)
        return render_prometheus(list(snapshots.values()))


def _cancel(stream) -> None:
    """Cancel a worker stream. Serve's ``cancel()`` re-raises the error that ended the call (e.g. the
    ``BackPressureError`` of a request no replica took), which would escape the handler and reach the
    client as Serve's plain-text answer instead of the OpenAI error; that error is handled by the caller."""
    with contextlib.suppress(Exception):
        stream.cancel()


def build_fastapi(ingress: OpenAIIngress) -> FastAPI:
    """The routes; the OpenAPI document lists each one's error answers (server/errors.py ``install_openapi``)."""
    app = FastAPI(title="tierserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_openapi(app, lambda doc: (state_server_limits(doc, ingress.max_model_len, ingress.vocab_size),
                                      state_stream_events(doc)))
    auth = (401,) if ingress.settings.api_key else ()
    # 200: the JSON response, or with "stream": true server-sent events (server/openapi_events.py)
    generate_errors = {200: {"content": {"text/event-stream": {}}},
                       **error_responses(400, *auth, 404, 413, 429, 503)}

    @app.get("/health")
    async def health():
        return JSONResponse({})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition of the exported metrics"}})
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await ingress.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(*auth))
    async def models():
        card = ModelCard(id=ingress.model_name, max_model_len=ingress.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions", response_model=CompletionResponse, responses=generate_errors)
    async def completions(req: CompletionRequest):
        return await ingress.respond("completion", req)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=generate_errors)
    async def chat_completions(req: ChatCompletionRequest):
        return await ingress.respond("chat", req)

    app.add_middleware(BodyLimitMiddleware, max_body_bytes=ingress.settings.max_body_bytes)
    if ingress.settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=ingress.settings.api_key)
    return app
