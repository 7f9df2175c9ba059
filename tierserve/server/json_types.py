"""JSON-typed scalars for the request models: a field accepts exactly the JSON values its schema names.

Pydantic's lax mode, which the request models otherwise keep, converts more than the
OpenAPI document admits: ``"5"`` and ``true`` to an integer, ``"1.5"`` and ``false`` to a
number, ``0``, ``"yes"`` and ``"off"`` to a boolean. A client that sends those gets no
error and a value it may not have meant, and the document (``"type": "integer"`` ...) is
not the contract the server keeps. These annotated types close the gap:

* ``JsonInt``: a JSON integer; a number with no fractional part (``1.0``) is one too, as
  JSON Schema says, so it is accepted; strings and booleans are refused.
* ``JsonFloat``: any JSON number (integers included); strings and booleans are refused.
* ``JsonBool``: ``true`` or ``false`` only (pydantic's ``StrictBool``).

A refused value is a validation error on that field, which the HTTP layer turns into a 400
naming it (server/errors.py ``validation_error``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, StrictBool


def _not_text_or_bool(kind: str):
    def check(value: Any) -> Any:
        if isinstance(value, (str, bool, bytes)):
            raise ValueError(f"Input should be a JSON {kind}, got {type(value).__name__} {value!r}")
        return value
    return check


JsonInt = Annotated[int, BeforeValidator(_not_text_or_bool("integer"))]
JsonFloat = Annotated[float, BeforeValidator(_not_text_or_bool("number"))]
JsonBool = StrictBool
