"""``to_api_error`` (server/errors.py): the exact HTTP error for every exception class it handles.

Each row of the mapping table in the module doc is checked field by field (status, type, code, param,
Retry-After, message), bare and wrapped the way Ray delivers an exception raised in another process
(``RayTaskError(...).as_instanceof_cause()``, nested twice for a call that crossed two actors). The
exception objects are Ray's and tierserve's own classes; nothing is faked. A live server answering each of
these statuses is tests/test_server_failures.py.
"""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    RayTaskError,
)
from ray.serve.exceptions import BackPressureError

from tierserve.errors import ContextLengthError, InvalidParameterError, TierserveError
from tierserve.server.errors import APIError, QueueFullError, replica_lost, to_api_error


def wrapped(exc: BaseException, depth: int = 1) -> BaseException:
    """``exc`` as the caller of ``depth`` nested Ray calls receives it."""
    for d in range(depth):
        exc = RayTaskError(f"call{d}", "Traceback (most recent call last): ...", exc).as_instanceof_cause()
    return exc


def fields(err: APIError) -> tuple:
    return err.status, err.type, err.code, err.param, err.headers


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_invalid_parameter_is_400_naming_the_field(depth):
    err = to_api_error(wrapped(InvalidParameterError("temperature", "must be >= 0, got -1"), depth))
    assert fields(err) == (400, "invalid_request_error", "invalid_value", "temperature", {})
    assert err.message == "temperature: must be >= 0, got -1"


@pytest.mark.parametrize("depth", [0, 1])
def test_context_overflow_is_400_context_length_exceeded(depth):
    exc = ContextLengthError(2100, 2048)
    err = to_api_error(wrapped(exc, depth))
    assert fields(err) == (400, "invalid_request_error", "context_length_exceeded", exc.field, {})
    assert err.message == str(exc) and "2100" in err.message and "2048" in err.message


@pytest.mark.parametrize("depth", [0, 1])
def test_queue_full_is_429_with_the_workers_retry_after(depth):
    err = to_api_error(wrapped(QueueFullError(limit=3, retry_after_s=7), depth), retry_after_s=1)
    assert fields(err) == (429, "rate_limit_error", "queue_full", None, {"Retry-After": "7"})
    assert "3 requests" in err.message


@pytest.mark.parametrize("depth", [0, 1])
def test_backpressure_is_503_overloaded_with_the_servers_retry_after(depth):
    exc = BackPressureError(num_queued_requests=12, max_queued_requests=12)
    err = to_api_error(wrapped(exc, depth), retry_after_s=4)
    assert fields(err) == (503, "service_unavailable_error", "overloaded", None, {"Retry-After": "4"})
    assert err.message == f"the server is overloaded: {exc}"


@pytest.mark.parametrize("exc", [ActorDiedError(), ActorUnavailableError("node unreachable", None),
                                 RayActorError()], ids=["died", "unavailable", "actor_error"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_lost_actor_is_503_replica_unavailable(exc, depth):
    assert replica_lost(wrapped(exc, depth))
    err = to_api_error(wrapped(exc, depth), retry_after_s=5)
    assert fields(err) == (503, "service_unavailable_error", "replica_unavailable", None, {"Retry-After": "5"})
    assert type(exc).__name__ in err.message


@pytest.mark.parametrize("exc", [RuntimeError("AsyncLLMEngine is closed"), KeyError("x"), ZeroDivisionError(),
                                 TierserveError("a bookkeeping error"), ValueError("not a parameter error")],
                         ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("depth", [0, 1])
def test_anything_else_is_500_naming_the_exception(exc, depth):
    assert not replica_lost(wrapped(exc, depth))
    err = to_api_error(wrapped(exc, depth))
    assert fields(err) == (500, "server_error", "internal_error", None, {})
    assert err.message == f"internal error: {type(exc).__name__}: {exc}"


def test_api_error_passes_through_unchanged_and_survives_pickling():
    original = APIError(418, "short and stout", type="teapot_error", param="spout", code="tip_over",
                        headers={"Retry-After": "2"})
    assert to_api_error(original) is original
    assert to_api_error(wrapped(original)) is original          # unwrap returns the cause object itself
    copy = pickle.loads(pickle.dumps(original))                 # how it crosses the worker -> ingress boundary
    assert fields(copy) == fields(original) and copy.message == original.message
    assert copy.body() == {"error": {"message": "short and stout", "type": "teapot_error", "param": "spout",
                                     "code": "tip_over"}}
    assert QueueFullError.__reduce__(QueueFullError(3, 7))[1] == (3, 7)


@pytest.mark.parametrize("exc", [InvalidParameterError("top_p", "must be in (0, 1], got 0"),
                                 ContextLengthError(2100, 2048, field="messages"), TierserveError("plain")],
                         ids=lambda e: type(e).__name__)
def test_tierserve_errors_cross_process_boundaries_typed(exc):
    """Ray pickles an exception raised in an actor; the default pickling calls the constructor with the
    message alone, which fails for errors whose constructor takes fields (tierserve/errors.py)."""
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc) and str(copy) == str(exc) and copy.__dict__ == exc.__dict__
    assert fields(to_api_error(wrapped(copy))) == fields(to_api_error(exc))


def test_an_unexpected_route_exception_answers_500_in_the_openai_body():
    """``install_error_handlers`` on a FastAPI app whose routes raise: a bug (RuntimeError) is a 500 and a lost
    actor a 503 with Retry-After, both in the OpenAI body, never Starlette's plain-text "Internal Server Error"."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tierserve.server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    @app.get("/lost")
    async def lost():
        raise wrapped(ActorDiedError())

    client = TestClient(app, raise_server_exceptions=False)
    resp = client.get("/bug")
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": {"message": "internal error: RuntimeError: a bug", "type": "server_error",
                                     "param": None, "code": "internal_error"}}
    resp = client.get("/lost")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "replica_unavailable"
