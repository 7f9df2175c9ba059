"""The limits of one running server, stated in its OpenAPI document.

The request models (server/protocol.py) document the bounds that hold for every
server; these depend on the model a server runs and are added when the ingress
builds its document (``state_server_limits``):

* ``max_tokens``, ``max_completion_tokens`` and ``min_tokens``: at most
  ``max_model_len - 1`` (a prompt has at least one token, and prompt plus
  completion must fit in the context);
* a prompt given as token ids: at most ``max_model_len - 1`` ids, each below the
  model's vocabulary size (the engine refuses others, naming ``prompt``).

Each is enforced with a 400 naming the field. What JSON Schema cannot state is
written in the operation's description instead: the prompt's tokens plus
``max_tokens`` must not exceed ``max_model_len`` (400, ``context_length_exceeded``),
and ``min_tokens`` must not exceed ``max_tokens`` (16 by default for completions,
the rest of the context for chat).
"""

from __future__ import annotations

#: The request schemas whose fields get the per-server bounds, by the path that takes them.
REQUEST_SCHEMAS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")


def context_rules(max_model_len: int) -> str:
    return (f"Beyond the schema: the prompt's tokens plus max_tokens (or max_completion_tokens) must not exceed "
            f"the context, max_model_len = {max_model_len} tokens (else 400, code context_length_exceeded); "
            f"min_tokens must not exceed max_tokens (16 by default for /v1/completions, the rest of the "
            f"context for /v1/chat/completions); each is answered with a 400 naming the field.")


def _bound_token_ids(form: dict, max_ids: int, vocab_size: int) -> None:
    """Bound an ``array of integer`` prompt form (or an array of those) in place."""
    if form.get("type") != "array":
        return
    items = form.get("items", {})
    if items.get("type") == "integer":
        form["maxItems"] = max_ids
        items["maximum"] = vocab_size - 1
    else:
        _bound_token_ids(items, max_ids, vocab_size)


def state_server_limits(doc: dict, max_model_len: int, vocab_size: int) -> None:
    """Add this server's bounds (module doc) to ``doc`` in place."""
    schemas = doc["components"]["schemas"]
    for path, name in REQUEST_SCHEMAS.items():
        props = schemas[name]["properties"]
        for field in _TOKEN_FIELDS:
            if field in props:
                props[field]["maximum"] = max_model_len - 1
        for form in props.get("prompt", {}).get("anyOf", []):
            _bound_token_ids(form, max_model_len - 1, vocab_size)
        op = doc["paths"][path]["post"]
        op["description"] = context_rules(max_model_len)
