"""Errors raised to users. Each names the offending field and the limit it broke."""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    """Unpickle a ``TierserveError`` without calling its constructor (see ``TierserveError.__reduce__``)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class TierserveError(Exception):
    """Base class of every error tierserve raises on purpose.

    Pickles with its class, message and attributes whatever its constructor's signature, so it crosses
    Ray boundaries intact (the default pickling of an exception calls the constructor with the message
    alone, which fails for the subclasses that take fields).
    """

    def __reduce__(self):
        return (_rebuild, (self.__class__, self.args, dict(self.__dict__)))


class InvalidParameterError(TierserveError, ValueError):
    """A request or config field is out of range.

    ``field`` names the field (e.g. ``"temperature"``); the message states the
    value given and the allowed range, so the HTTP layer can map it to an
    OpenAI-shaped 400 with ``param=field``.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class ContextLengthError(InvalidParameterError):
    """A prompt (plus max_tokens) does not fit in the model's context."""

    def __init__(self, num_tokens: int, max_model_len: int, field: str = "prompt"):
        super().__init__(
            field,
            f"the prompt has {num_tokens} tokens but max_model_len is {max_model_len}",
        )
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class ModelLoadError(TierserveError):
    """A model path or checkpoint cannot be loaded (missing, malformed, unsupported)."""


class UnsupportedTensorTypeError(ModelLoadError):
    """A GGUF tensor uses a ggml type the loader does not decode."""

    def __init__(self, tensor_name: str, type_name: str, supported: list[str]):
        super().__init__(
            f"GGUF tensor {tensor_name!r} has type {type_name}, which tierserve cannot "
            f"decode; supported types: {', '.join(supported)}"
        )
        self.tensor_name = tensor_name
        self.type_name = type_name
