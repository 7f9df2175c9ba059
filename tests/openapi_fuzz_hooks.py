"""Schemathesis hooks of tests/test_openapi_schemathesis.py (loaded through ``SCHEMATHESIS_HOOKS``).

JSON Schema cannot relate two fields, so the served document states two rules in
words (server/openapi_limits.py ``context_rules``): the prompt's tokens plus
``max_tokens`` fit in ``max_model_len``, and ``min_tokens <= max_tokens``. A
schema-valid request that breaks one is a documented 400, which schemathesis's
``positive_data_acceptance`` would report as a valid request refused. These hooks
keep the *positive* cases of the two generate operations within those rules, as a
client that read the document would:

* ``filter_case``: drop a positive case whose prompt alone fills the context (it
  cannot be made valid without rewriting the prompt);
* ``map_case``: lower ``max_tokens`` / ``max_completion_tokens`` to what the prompt
  leaves, and ``min_tokens`` to the effective ``max_tokens``.

Negative cases, and every other operation, are sent as generated; every check runs on
every case. The prompt is counted with transformers' tokenizer of the served folder
(``TS_FUZZ_MODEL``), the way the server builds it (completions: ``encode(prompt)``;
chat: the chat template rendered, then encoded without special tokens). A chat the
template cannot render is left as generated.
"""

from __future__ import annotations

import os

import schemathesis
from schemathesis import GenerationMode
from transformers import AutoTokenizer

MAX_MODEL_LEN = int(os.environ.get("TS_FUZZ_MAX_MODEL_LEN", "0"))
#: OpenAI's default max_tokens of /v1/completions (server/protocol.py COMPLETION_DEFAULT_MAX_TOKENS).
COMPLETION_DEFAULT = 16
_tokenizer = None


def _tok():
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = AutoTokenizer.from_pretrained(os.environ["TS_FUZZ_MODEL"])
    return _tokenizer


def _is_int(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()


def _chat_text(m: dict) -> str:
    c = m.get("content")
    return c if isinstance(c, str) else "".join(p["text"] for p in c or [])


def prompt_tokens(path: str, body: dict) -> int | None:
    """The prompt's token count as the server computes it; None where it cannot be computed."""
    try:
        if path == "/v1/completions":
            p = body["prompt"]
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]
            return len(p) if isinstance(p, list) else len(_tok().encode(p))
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": _chat_text(m)}
                for m in body["messages"]]
        text = _tok().apply_chat_template(msgs, tokenize=False,
                                          add_generation_prompt=body.get("add_generation_prompt", True))
        return len(_tok().encode(text, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - an odd body: sent as generated, the server's answer is checked
        return None


def _positive_generate(case) -> bool:
    meta = case.meta
    return (case.method.upper() == "POST" and case.operation.path in ("/v1/completions", "/v1/chat/completions")
            and isinstance(case.body, dict) and meta is not None and meta.generation.mode == GenerationMode.POSITIVE)


@schemathesis.hook
def filter_case(context, case) -> bool:
    if not _positive_generate(case):
        return True
    n = prompt_tokens(case.operation.path, case.body)
    return n is None or n < MAX_MODEL_LEN


@schemathesis.hook
def map_case(context, case):
    if not _positive_generate(case):
        return case
    body = case.body
    n = prompt_tokens(case.operation.path, body)
    if n is None or n >= MAX_MODEL_LEN:
        return case
    room = MAX_MODEL_LEN - n
    field = "max_tokens"
    if case.operation.path == "/v1/chat/completions" and body.get("max_completion_tokens") is not None:
        field = "max_completion_tokens"
    value = body.get(field)
    if _is_int(value):
        effective = min(int(value), room)
        if value > room:
            body[field] = room
    elif value is None and case.operation.path == "/v1/completions":
        effective = min(COMPLETION_DEFAULT, room)
        if room < COMPLETION_DEFAULT:
            body["max_tokens"] = room
    else:
        effective = room
    if _is_int(body.get("min_tokens")) and body["min_tokens"] > effective:
        body["min_tokens"] = effective
    return case
