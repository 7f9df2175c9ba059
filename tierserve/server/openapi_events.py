"""The server-sent events of a streamed answer, stated in the OpenAPI document.

With ``"stream": true`` the 200 answer of ``/v1/completions`` and
``/v1/chat/completions`` is ``text/event-stream``; OpenAPI (3.1, and 3.2's
``itemSchema``) describes each event as an object of its fields. Every event this
server sends has one field, ``data`` (server/responses.py ``sse``), which is either

* one chunk as JSON: ``CompletionChunk`` or ``ChatCompletionChunk``
  (server/protocol.py, ``None`` fields left out), the last one carrying ``usage`` when
  ``stream_options.include_usage``;
* an error that happened after the stream started: the ``ErrorResponse`` body
  (server/errors.py), then the terminator;
* the terminator, the literal ``[DONE]``.

``stream_event_schema`` builds that schema (JSON payloads as ``contentMediaType:
application/json`` with a ``contentSchema``); ``state_stream_events`` puts it under each
generate operation's ``text/event-stream`` answer and adds the chunk models to the
document's components.
"""

from __future__ import annotations

from pydantic import BaseModel

from tierserve.server.protocol import ChatCompletionChunk, CompletionChunk

#: The terminator event's data.
DONE = "[DONE]"
_COMPONENTS = "#/components/schemas/{model}"
#: The chunk model of each generate path.
CHUNKS: dict[str, type[BaseModel]] = {"/v1/completions": CompletionChunk,
                                      "/v1/chat/completions": ChatCompletionChunk}


def stream_event_schema(chunk_name: str) -> dict:
    """One event of a stream whose chunks are ``#/components/schemas/<chunk_name>``."""
    payload = {"anyOf": [{"$ref": _COMPONENTS.format(model=chunk_name)},
                         {"$ref": _COMPONENTS.format(model="ErrorResponse")}]}
    data = {"anyOf": [{"const": DONE},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _add_component(schemas: dict, model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=_COMPONENTS)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas.setdefault(model.__name__, schema)


def state_stream_events(doc: dict) -> None:
    """Document the events of every generate operation's stream in ``doc`` (in place)."""
    schemas = doc["components"]["schemas"]
    for path, chunk in CHUNKS.items():
        _add_component(schemas, chunk)
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": stream_event_schema(chunk.__name__)}
