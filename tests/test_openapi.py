"""The served OpenAPI document matches the server (tests/ray_fixtures.py apps, live).

Checked against the running apps: no 422 anywhere (validation errors are 400); every /v1 operation
documents the error body under the statuses it answers (401 only where an API key is set; Retry-After
on 429 and 503); the error bodies the server really sends (400, 404, 405, 401) validate against the
documented schema; the prompt's non-empty constraint is in the schema and enforced; /metrics is
documented and served as text/plain; a 405 names the allowed methods in ``Allow``. Without a server: every
numeric bound the request schemas state is the one the server enforces (the bound accepted, one step past
it refused naming the field). Live again: the per-server bounds (max_model_len - 1, vocabulary) are in the
document and enforced; fields take only their documented JSON types; the cross-field rules are if/then in
the schema and 400s on the wire; every event of a real stream validates against the documented event schema.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from ray_fixtures import STRICT_KEY

GENERATE = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def servers(tierserve_servers):
    return tierserve_servers


@pytest.fixture(scope="module")
def docs(servers):
    return {name: requests.get(f"{base}/openapi.json", timeout=60).json()
            for name, base in (("main", servers.main), ("strict", servers.strict))}


def check_error_body(doc: dict, resp: requests.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    schema = {"$ref": "#/components/schemas/ErrorResponse", "components": doc["components"]}
    body = resp.json()
    jsonschema.validate(body, schema)
    return body["error"]


def test_no_422_and_every_error_status_documented(docs):
    for name, doc in docs.items():
        assert "422" not in str(doc["paths"]) and "HTTPValidationError" not in doc["components"]["schemas"]
        auth = {"401"} if name == "strict" else set()
        for path in GENERATE:
            responses = doc["paths"][path]["post"]["responses"]
            assert set(responses) == {"200", "400", "404", "413", "429", "503"} | auth, (name, path)
            for status in ("400", "404", "413", "429", "503", *auth):
                content = responses[status]["content"]
                assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
            for status in ("429", "503"):
                assert set(responses[status]["headers"]) == {"Retry-After"}
            assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert set(doc["paths"]["/v1/models"]["get"]["responses"]) == {"200"} | auth
    err = docs["main"]["components"]["schemas"]["ErrorDetail"]
    assert set(err["required"]) == {"message", "type"} and set(err["properties"]) == {"message", "type", "param", "code"}


def test_real_error_bodies_match_the_documented_schema(servers, docs):
    doc = docs["main"]
    url = f"{servers.main}/v1/completions"
    assert check_error_body(doc, requests.post(url, json={"prompt": "Hi", "temperature": -1}, timeout=60),
                            400)["param"] == "temperature"
    assert check_error_body(doc, requests.post(url, json={"model": "gpt-9", "prompt": "Hi"}, timeout=60),
                            404)["code"] == "model_not_found"
    assert check_error_body(doc, requests.get(f"{servers.main}/v1/nowhere", timeout=60), 404)["code"] == "not_found"
    strict = docs["strict"]
    assert check_error_body(strict, requests.get(f"{servers.strict}/v1/models", timeout=60),
                            401)["code"] == "invalid_api_key"


def test_the_prompt_constraint_is_documented_and_enforced(servers, docs):
    prompt = docs["main"]["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    forms = prompt["anyOf"]
    assert {"type": "string", "minLength": 1} in forms
    ids = next(f for f in forms if f["type"] == "array" and f["items"].get("type") == "integer")
    assert ids["minItems"] == 1 and ids["items"]["minimum"] == 0   # the upper bounds: test_server_limits_...
    assert all(f.get("minLength") == 1 or f.get("minItems") == 1 for f in forms)
    url = f"{servers.main}/v1/completions"
    for bad in ("", [], [""], [[]], [-1], ["a", "b"]):
        err = check_error_body(docs["main"], requests.post(url, json={"prompt": bad, "max_tokens": 1}, timeout=60), 400)
        assert err["param"] == "prompt", bad


def test_metrics_is_text_plain_in_the_document_and_on_the_wire(servers, docs):
    ok = docs["main"]["paths"]["/metrics"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"text/plain"}
    r = requests.get(f"{servers.main}/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_405_names_the_allowed_methods(servers, docs):
    for method, path, allowed in (("put", "/v1/completions", {"POST"}), ("get", "/v1/chat/completions", {"POST"}),
                                  ("post", "/v1/models", {"GET"})):
        r = requests.request(method, f"{servers.main}{path}", timeout=60)
        check_error_body(docs["main"], r, 405)
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, (method, path)
    r = requests.put(f"{servers.strict}/v1/completions", headers={"Authorization": f"Bearer {STRICT_KEY}"},
                     timeout=60)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_union_field_error_names_the_field_and_each_form():
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from tierserve.server.errors import validation_error
    from tierserve.server.protocol import CompletionRequest

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"prompt": 5})
    err = validation_error(RequestValidationError([{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()]))
    assert (err.status, err.param, err.code) == (400, "prompt", "invalid_value")
    assert err.message.startswith("prompt: matches none of its accepted forms (as str: Input should be a valid string")
    assert err.message.count("; as ") == 3                       # str, list[int], list[str], list[list[int]]


def _numeric_bounds(schema: dict):
    """(field, value, accepted) triples at and just past every numeric bound a schema states."""
    for name, prop in schema["properties"].items():
        if "minimum" in prop:
            yield name, prop["minimum"], True
            yield name, prop["minimum"] - (1 if isinstance(prop["minimum"], int) else 0.01), False
        if "maximum" in prop:
            yield name, prop["maximum"], True
            yield name, prop["maximum"] + (1 if isinstance(prop["maximum"], int) else 0.01), False
        if "exclusiveMinimum" in prop:
            yield name, prop["exclusiveMinimum"], False
            yield name, prop["exclusiveMinimum"] + 0.01, True


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_documented_bounds_are_the_enforced_ones(kind):
    """Every numeric bound in the request schema: the bound is accepted, one step past it is refused
    with a 400-mapped error naming the field (the server's own checks, not pydantic's)."""
    from tierserve.errors import InvalidParameterError
    from tierserve.server.protocol import ChatCompletionRequest, CompletionRequest

    cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    base = {"prompt": "hi"} if kind == "completion" else {"messages": [{"role": "user", "content": "hi"}]}
    if kind == "chat":
        base["logprobs"] = True  # top_logprobs needs it
    cases = list(_numeric_bounds(cls.model_json_schema()))
    assert {name for name, _, _ in cases} >= {"max_tokens", "temperature", "top_p", "n", "presence_penalty",
                                               "frequency_penalty", "min_p", "top_h", "repetition_penalty",
                                               "min_tokens"}
    for name, value, accepted in cases:
        req = cls.model_validate({**base, "max_tokens": 64, name: value})
        if accepted:
            req.to_sampling_params(4096, 4)
        else:
            with pytest.raises(InvalidParameterError) as e:
                req.to_sampling_params(4096, 4)
            assert e.value.field == name, (name, value, e.value)


def test_server_limits_are_documented_and_enforced(servers, docs):
    """max_model_len - 1 bounds the token fields and a token-id prompt, vocab_size - 1 each id: the bound is
    accepted by the server's checks, one past it is a 400 naming the field (server/openapi_limits.py)."""
    doc = docs["main"]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    models = requests.get(f"{servers.main}/v1/models", timeout=60).json()["data"][0]
    top = models["max_model_len"] - 1
    assert props["max_tokens"]["maximum"] == props["min_tokens"]["maximum"] == top
    ids = next(f for f in props["prompt"]["anyOf"] if f.get("items", {}).get("type") == "integer")
    assert ids["maxItems"] == top
    vocab_top = ids["items"]["maximum"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["max_tokens"]["maximum"] == chat["max_completion_tokens"]["maximum"] == top
    assert "max_model_len = 2048" in doc["paths"]["/v1/completions"]["post"]["description"]
    url = f"{servers.main}/v1/completions"
    for body, param in (({"prompt": [1], "max_tokens": top + 1}, "max_tokens"),
                        ({"prompt": [1] * (top + 1), "max_tokens": 1}, "prompt"),
                        ({"prompt": [vocab_top + 1], "max_tokens": 1}, "prompt")):
        assert check_error_body(doc, requests.post(url, json=body, timeout=60), 400)["param"] == param
    ok = requests.post(url, json={"prompt": [vocab_top], "max_tokens": 1}, timeout=120)
    assert ok.status_code == 200, ok.text
    # max_tokens beside max_completion_tokens is unused, but still held to its documented range
    chat_url = f"{servers.main}/v1/chat/completions"
    msgs = [{"role": "user", "content": "Hi"}]
    r = requests.post(chat_url, json={"messages": msgs, "max_completion_tokens": 1, "max_tokens": top + 1}, timeout=60)
    assert check_error_body(doc, r, 400)["param"] == "max_tokens"


def test_fields_take_only_the_json_types_documented(servers, docs):
    """No lax coercion: "5", true and 0 are not integers, numbers or booleans here (server/json_types.py)."""
    url = f"{servers.main}/v1/completions"
    for field, value in (("max_tokens", "5"), ("max_tokens", True), ("temperature", "0.5"), ("temperature", False),
                         ("echo", 0), ("stream", "true"), ("ignore_eos", 1), ("prompt", [True])):
        r = requests.post(url, json={"prompt": "Hi", "max_tokens": 1, field: value}, timeout=60)
        assert check_error_body(docs["main"], r, 400)["param"] == field, (field, value)
    # JSON Schema's integer includes 1.0: accepted where an integer is documented
    r = requests.post(url, json={"prompt": "Hi", "max_tokens": 1.0, "top_k": 0.0}, timeout=120)
    assert r.status_code == 200, r.text


def test_cross_field_rules_in_the_schema(servers, docs):
    """top_logprobs needs logprobs, stream_options needs stream: stated as if/then and answered with 400."""
    schema = {"$ref": "#/components/schemas/ChatCompletionRequest", "components": docs["main"]["components"]}
    msgs = [{"role": "user", "content": "Hi"}]
    for body, param in (({"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": msgs, "stream_options": {"include_usage": True}}, "stream_options")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        r = requests.post(f"{servers.main}/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=60)
        assert check_error_body(docs["main"], r, 400)["param"] == param
    jsonschema.validate({"messages": msgs, "top_logprobs": 2, "logprobs": True}, schema)
    jsonschema.validate({"messages": msgs, "top_logprobs": None}, schema)


@pytest.mark.parametrize("path", GENERATE)
def test_every_stream_event_matches_the_documented_event_schema(servers, docs, path):
    """Each SSE event of a streamed answer (chunks, usage chunk, [DONE]) validates against the documented
    event schema, its JSON data against the chunk schema; an error event's body against ErrorResponse."""
    doc = docs["main"]
    event_schema = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data_forms = event_schema["properties"]["data"]["anyOf"]
    assert data_forms[0] == {"const": "[DONE]"} and event_schema["required"] == ["data"]
    payload = {**data_forms[1]["contentSchema"], "components": doc["components"]}
    body = {"prompt": "Once upon a time"} if path == GENERATE[0] else {"messages": [{"role": "user", "content": "Hi"}]}
    body.update(max_tokens=4, stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    events = []
    with requests.post(f"{servers.main}{path}", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if line:
                assert line.startswith("data: "), line
                events.append({"data": line[len("data: "):]})
    assert events[-1] == {"data": "[DONE]"} and len(events) >= 3
    for event in events:
        jsonschema.validate(event, {**event_schema, "components": doc["components"]})
        if event["data"] != "[DONE]":
            chunk = json.loads(event["data"])
            jsonschema.validate(chunk, payload)
            assert "error" not in chunk
    assert "usage" in json.loads(events[-2]["data"])
    # an error body is one of the documented payloads
    jsonschema.validate({"error": {"message": "m", "type": "t"}}, payload)
