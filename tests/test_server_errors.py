"""Every HTTP error the server returns, live: status, OpenAI body shape, and the openai client's type.

Raw shapes through ``requests``; the same errors through the official client's exception classes.
Apps: tests/ray_fixtures.py (``strict``: API key, 2 running + 1 waiting, 32 KiB body limit).
"""

from __future__ import annotations

import threading

import openai
import pytest
import requests
from polling import wait_for
from ray_fixtures import STRICT_KEY


@pytest.fixture(scope="module")
def servers(tierserve_servers):
    return tierserve_servers


@pytest.fixture(scope="module")
def model_name(servers):
    return requests.get(f"{servers.main}/v1/models", timeout=30).json()["data"][0]["id"]


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body=None, **kw) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kw) if body is not None else requests.post(url, timeout=60, **kw)


def error_of(resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", "many"), ("max_tokens", "abc"), ("max_tokens", 0),
    ("n", 2), ("presence_penalty", 5.0), ("min_p", 2.0), ("repetition_penalty", 0.0), ("logprobs", 50),
    ("stream_options", {"include_usage": True}), ("echo", True), ("best_of", 3),
])
def test_invalid_field_is_400_naming_it(servers, field, value):
    err = error_of(post(f"{servers.main}/v1/completions", {"prompt": "Hi", field: value}), 400)
    assert err["param"] == field and err["type"] == "invalid_request_error"


def test_chat_validation_errors(servers, model_name):
    url = f"{servers.main}/v1/chat/completions"
    assert error_of(post(url, {"messages": []}), 400)["param"] == "messages"
    assert error_of(post(url, {"messages": [{"role": "wizard", "content": "x"}]}), 400)["param"] == "messages"
    assert error_of(post(url, {"model": model_name}), 400)["param"] == "messages"          # missing
    err = error_of(post(url, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"
    err = error_of(post(url, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
                   400)
    assert err["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        client(servers.main).chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}],
                                                     n=3)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"


def test_invalid_json_is_400(servers):
    resp = post(f"{servers.main}/v1/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert error_of(resp, 400)["code"] == "invalid_json"


def test_context_overflow_names_both_numbers(servers, model_name):
    url = f"{servers.main}/v1/completions"
    err = error_of(post(url, {"prompt": list(range(100, 2200)), "max_tokens": 1}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "2048" in err["message"] and "2100" in err["message"]
    err = error_of(post(url, {"prompt": list(range(100, 1100)), "max_tokens": 1500}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert all(str(n) in err["message"] for n in (2048, 2500, 1000, 1500))
    err = error_of(post(f"{servers.main}/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}), 400)
    assert err["param"] == "max_completion_tokens" and err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client(servers.main).completions.create(model=model_name, prompt="hi", max_tokens=4000)
    assert e.value.code == "context_length_exceeded"


def test_out_of_vocabulary_token_is_400(servers):
    err = error_of(post(f"{servers.main}/v1/completions", {"prompt": [1, 2, 10**7], "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and str(10**7) in err["message"]


def test_unknown_model_is_404(servers, model_name):
    err = error_of(post(f"{servers.main}/v1/completions", {"model": "gpt-9", "prompt": "Hi"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and model_name in err["message"]
    with pytest.raises(openai.NotFoundError):
        client(servers.main).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert error_of(requests.get(f"{servers.main}/v1/nothing", timeout=30), 404)["code"] == "not_found"


def test_body_too_large_is_413(servers):
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    big = {"prompt": "word " * 20000, "max_tokens": 1}                 # ~100 KB > 32 KiB
    err = error_of(post(f"{servers.strict}/v1/completions", big, headers=headers), 413)
    assert err["code"] == "request_too_large" and str(32 * 1024) in err["message"]

    def chunks():                                                       # no Content-Length: counted
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    resp = requests.post(f"{servers.strict}/v1/completions", data=chunks(), timeout=60,
                         headers={**headers, "content-type": "application/json"})
    assert error_of(resp, 413)["code"] == "request_too_large"


def test_api_key_required(servers):
    url = f"{servers.strict}/v1/completions"
    body = {"prompt": "Hi", "max_tokens": 2}
    err = error_of(post(url, body), 401)
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    error_of(post(url, body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(requests.get(f"{servers.strict}/v1/models", timeout=30), 401)
    assert post(url, body, headers={"Authorization": f"Bearer {STRICT_KEY}"}).status_code == 200
    assert requests.get(f"{servers.strict}/health", timeout=30).status_code == 200   # open, as in vLLM
    with pytest.raises(openai.AuthenticationError):
        client(servers.strict, key="wrong").models.list()
    assert client(servers.strict, key=STRICT_KEY).models.list().data[0].id == "strict"


def test_queue_full_is_429_with_retry_after(servers):
    """strict holds 2 running + 1 waiting: a 4th concurrent request is refused, a later one is served."""
    from ray import serve
    from ray_fixtures import STRICT_APP

    worker = serve.get_deployment_handle("LLMServer", app_name=STRICT_APP)
    headers = {"Authorization": f"Bearer {STRICT_KEY}"}
    url = f"{servers.strict}/v1/completions"
    long_body = {"prompt": "Go on:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold():  # a streaming client that stays until told to leave (a waiting one gets headers later)
        with requests.post(url, json=long_body, headers=headers, stream=True, timeout=120) as r:
            lines = r.iter_lines()   # keep a reference: a collected iterator closes the connection
            next(lines)
            stop.wait()  # no timeout: the finally below always sets it, however long the checks take

    holders = [threading.Thread(target=hold) for _ in range(3)]
    try:
        for t in holders:
            t.start()
        stats = worker.stats.remote
        wait_for(lambda: (s := stats().result()) and (s.active, s.running, s.waiting) == (3, 2, 1),
                 show=lambda: stats().result())
        resp = post(url, {"prompt": "Hi", "max_tokens": 2}, headers=headers)
        err = error_of(resp, 429)
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert int(resp.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client(servers.strict, key=STRICT_KEY).completions.create(model="strict", prompt="Hi", max_tokens=2)
    finally:
        stop.set()
        for t in holders:
            t.join(timeout=60)
    wait_for(lambda: worker.stats.remote().result().active == 0,      # the disconnects freed the slots
             show=lambda: worker.stats.remote().result())
    assert post(url, {"prompt": "Hi", "max_tokens": 2}, headers=headers).status_code == 200


