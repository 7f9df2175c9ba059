"""OpenAI-shaped HTTP errors: ``{"error": {"message", "type", "param", "code"}}``.

Mapping (``to_api_error``):

====================================  ======  =========================  ============================
cause                                 status  type                       code
====================================  ======  =========================  ============================
InvalidParameterError (field)         400     invalid_request_error      invalid_value (param=field)
context overflow (both numbers)       400     invalid_request_error      context_length_exceeded
FastAPI RequestValidationError        400     invalid_request_error      invalid_value (param=field)
unknown model                         404     invalid_request_error      model_not_found
unknown route                         404     invalid_request_error      not_found
body over ``max_body_bytes``          413     invalid_request_error      request_too_large
missing / wrong API key               401     authentication_error       invalid_api_key
worker queue bound reached            429     rate_limit_error           queue_full (+ Retry-After)
Serve handle queue full (backpressure) 503    service_unavailable_error  overloaded (+ Retry-After)
a Ray actor died / is unreachable     503     service_unavailable_error  replica_unavailable (+ Retry-After)
anything else                         500     server_error               internal_error
====================================  ======  =========================  ============================

Errors raised inside a Serve replica reach the ingress wrapped in
``ray.exceptions.RayTaskError``; ``unwrap`` takes its ``cause``. Exceptions
with custom constructors do not unpickle there, so the worker converts every
request error to an ``APIError`` (picklable through ``__reduce__``) before it
leaves the replica.

A worker replica that dies (its process killed, its node lost) surfaces as
``ray.exceptions.ActorDiedError`` (``ActorUnavailableError`` while Ray cannot
reach it); both are ``RayActorError`` (``replica_lost``). The ingress retries
a request whose replica died before it produced anything the client saw
(server/ingress.py, "Replica death"); otherwise the loss is a 503: Serve
restarts the replica, so the client may retry after ``Retry-After``.

Any other exception a route raises becomes the 500 above, in the same body
(``install_error_handlers``), never Starlette's plain-text page.

The OpenAPI document says the same (``install_openapi``): every ``/v1``
operation lists the error body (``ErrorResponse``) under the statuses it can
answer (``error_responses``: 400, 401 with an API key, 404, 413, 429 and 503
with ``Retry-After``), and FastAPI's default 422 entry, which this server
never answers (validation errors are 400), is removed with its schemas. A
405 (known path, wrong method) carries Starlette's ``Allow`` header through
the error handler.

Two ASGI middlewares guard the app before any parsing: ``BodyLimitMiddleware``
reads at most ``max_body_bytes`` (+1) of the body (the Content-Length header
is checked first, then the bytes actually received, so chunked uploads are
bounded too) and ``ApiKeyMiddleware`` requires ``Authorization: Bearer <key>``
on ``/v1/*`` when a key is configured (compared in constant time; /health and
/metrics stay open, as in vLLM).
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierserve.errors import ContextLengthError, InvalidParameterError, TierserveError
from tierserve.server.serve_options import DEFAULT_MAX_BODY_BYTES  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An HTTP error with its OpenAI body; raise it anywhere in a route."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def __reduce__(self):  # crosses Ray boundaries (worker -> ingress) intact
        return (APIError, (self.status, self.message, self.type, self.param, self.code, self.headers))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (the OpenAPI schema of ``APIError.body``)."""

    error: ErrorDetail


#: What each error status means, for the OpenAPI document.
_ERROR_DESCRIPTIONS = {
    400: "invalid request: a field out of range (param names it), bad JSON, or the context overflows",
    401: "missing or invalid API key (only when the server has one)",
    404: "unknown model or path",
    413: "request body over the server's limit",
    429: "the replica's queue is full; retry after Retry-After seconds",
    503: "the server is overloaded, draining, or lost the replica serving the request; retry after Retry-After "
         "seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict:
    """FastAPI ``responses=`` entries: the error body under each status (``Retry-After`` on 429/503)."""
    out: dict = {}
    for status in statuses:
        entry: dict = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out


def install_openapi(app: FastAPI, refine: Callable[[dict], None] | None = None) -> None:
    """Serve an OpenAPI document without FastAPI's 422 entries (this server answers 400 instead);
    ``refine`` then adds what only the running server knows (server/openapi_limits.py)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            # a copy: schema dicts given to pydantic (e.g. protocol.PROMPT_SCHEMA) may appear by reference
            doc = copy.deepcopy(get_openapi(title=app.title, version=app.version, routes=app.routes))
            for path in doc.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            if "422" not in json.dumps(doc.get("paths", {})):
                schemas.pop("HTTPValidationError", None)
                schemas.pop("ValidationError", None)
            if refine is not None:
                refine(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


class QueueFullError(TierserveError):
    """A worker replica already holds ``limit`` requests (running + waiting)."""

    def __init__(self, limit: int, retry_after_s: int):
        super().__init__(f"the server is at capacity ({limit} requests running or waiting); "
                         f"retry after {retry_after_s} s")
        self.limit = limit
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (QueueFullError, (self.limit, self.retry_after_s))


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                    param="model", code="model_not_found")


def unwrap(exc: BaseException) -> BaseException:
    """The original exception of an error that crossed a Ray boundary."""
    import ray

    while isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (possibly wrapped) says the actor serving the call died or cannot be reached."""
    import ray

    return isinstance(unwrap(exc), ray.exceptions.RayActorError)


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The HTTP error for ``exc`` (the table in the module doc)."""
    from ray.serve.exceptions import BackPressureError

    exc = unwrap(exc)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameterError):
        code = "context_length_exceeded" if (
            isinstance(exc, ContextLengthError) or hasattr(exc, "max_model_len")) else "invalid_value"
        return APIError(400, str(exc), param=exc.field, code=code)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, BackPressureError):
        return APIError(503, f"the server is overloaded: {exc}", type="service_unavailable_error",
                        code="overloaded", headers={"Retry-After": str(retry_after_s)})
    if replica_lost(exc):
        return APIError(503, f"a Ray actor serving this request died or cannot be reached ({type(exc).__name__}): "
                             f"Serve restarts replicas; retry after {retry_after_s} s", type="service_unavailable_error",
                        code="replica_unavailable", headers={"Retry-After": str(retry_after_s)})
    logger.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                    code="internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    where = ".".join(str(p) for p in loc) or "body"
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    branches = _union_branches(errors, param)
    if len(branches) > 1:  # a union field (e.g. prompt): say what each accepted form objected
        detail = "; ".join(f"as {tag}: {msg}" for tag, msg in branches.items())
        return APIError(400, f"{param}: matches none of its accepted forms ({detail})", param=param,
                        code="invalid_value")
    return APIError(400, f"{where}: {first.get('msg')}", param=param, code="invalid_value")


def _union_branches(errors: list, param: str | None) -> dict[str, str]:
    """For errors of one union field, its branch tag (pydantic's second loc item) -> first message."""
    out: dict[str, str] = {}
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        if len(loc) >= 2 and loc[0] == param and isinstance(loc[1], str):
            out.setdefault(loc[1], str(e.get("msg")))
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(TierserveError)
    async def _tierserve(request: Request, exc: TierserveError):
        return to_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        # keep the exception's headers: Starlette's 405 names the allowed methods in Allow
        return APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug or a lost actor: still the OpenAI body
        return to_api_error(exc).response()


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes",
                    param=None, code="request_too_large")


class BodyLimitMiddleware:
    """Reject bodies over ``max_body_bytes`` with 413 before the app parses them."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, _too_large(limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """Require ``Authorization: Bearer <api_key>`` on /v1/* (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope).startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return await _send_error(send, APIError(
                    401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error", code="invalid_api_key"))
        return await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path below the app's mount point (Serve mounts apps under a route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
