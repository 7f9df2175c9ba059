"""Per-request sampling parameters, validated at construction.

Every out-of-range value raises :class:`InvalidParameterError` naming the field
and the allowed range; the OpenAI layer maps that to a 400 with ``param``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierserve.errors import InvalidParameterError

#: Top-H's entropy fraction when a caller enables it without a value
#: (Top-H paper's reference code; 0.3-0.5 recommended).
TOP_H_DEFAULT_ALPHA = 0.4


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k <= 0 disables top-k. top_p = 1, min_p = 0
    and top_h = 0 disable those filters. top_h is Top-H's alpha (entropy
    fraction, see engine/top_h.py). Penalties follow OpenAI (presence,
    frequency: additive over generated tokens) and the CTRL/HF repetition
    penalty (multiplicative over prompt and generated tokens).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    top_h: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int), "top_k", f"must be an integer, got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(0.0 <= self.top_h <= 1.0, "top_h", f"must be in [0, 1], got {self.top_h}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"must be in [0, 20], got {self.logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be non-empty strings")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(name, message)
