"""Incremental detokenization with stop strings, one token at a time.

Decoding (the prefix/read offset scheme, as a window decode over ids):
``ids`` holds the last ``PROMPT_CONTEXT_TOKENS`` = 5 prompt tokens (so that
tokenizers that strip a leading space from the first token, e.g.
SentencePiece, decode the first output token right) followed by the outputs.
``prefix`` and ``read`` are offsets into ``ids``; ``ids[prefix:read]`` is
already-emitted context. For each new token:

    prefix_text = decode(ids[prefix:read]);  new_text = decode(ids[prefix:])
    if len(new_text) > len(prefix_text) and not new_text.endswith("\\ufffd"):
        delta = new_text[len(prefix_text):];  prefix, read = read, len(ids)

so bytes of an unfinished UTF-8 character (decoded as U+FFFD) are held until
the character completes. ``decode`` honours ``skip_special_tokens`` and never
cleans up tokenization spaces (so deltas concatenate to the full decode).
Each step decodes only the window since the last emission: O(new text), not
O(output length); ids before ``prefix`` are dropped every 64 tokens.

Stop strings (``params.stop``): text is matched as if it arrived one
character at a time, so the result does not depend on how it is split into
tokens: the stop string that *completes first* wins (ties: the one starting
first). The output is truncated at its start, or at its end with
``include_stop_str_in_output``, and ``stopped`` names it; later ``add`` calls
return "". Without include_stop_str_in_output, the longest suffix of the text
that is a proper prefix of some stop string is held back until the next
characters either complete the stop string (dropped) or diverge (released),
so a streaming client never sees part of a stop string. With it, nothing is
held: a stop string, once complete, is part of the output anyway. Each step
searches only the held text, the new text and the last (max stop length - 1)
emitted characters.

``flush()`` ends the stream (eos, stop token, length): it releases held text
and any incomplete trailing bytes (as U+FFFD, like ``tokenizer.decode``),
still applying stop strings. Concatenated ``add`` deltas plus ``flush()``
equal ``text``, which equals ``tokenizer.decode(output_ids)`` truncated at the
stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.sampling_params import SamplingParams

#: Prompt tokens kept as decoding context for the first output tokens.
PROMPT_CONTEXT_TOKENS = 5
#: Drop consumed ids once this many sit before the decode window.
_TRIM_EVERY = 64
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, applying stop strings."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._chunks: list[str] = []      # emitted deltas
        self._tail = ""                   # last (max_stop - 1) emitted characters
        self._held = ""                   # decoded, not yet emitted (may start a stop string)
        self._text_cache: str | None = ""
        self.stopped: str | None = None
        self.finished = False

    # ---------------------------------------------------------------- public
    @property
    def text(self) -> str:
        """The output text so far (emitted plus held back), cut at a matched stop string."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
        return self._text_cache + self._held

    def add(self, token_id: int) -> str:
        """Append one output token; return the newly releasable text ("" if none)."""
        if self.stopped is not None or self.finished:
            return ""
        self._ids.append(int(token_id))
        return self._accept(self._decode_step(final=False), final=False)

    def flush(self) -> str:
        """End of stream: return everything still held (stop strings still apply)."""
        if self.stopped is not None or self.finished:
            return ""
        delta = self._accept(self._decode_step(final=True), final=True)
        self.finished = True
        return delta

    # -------------------------------------------------------------- decoding
    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special,
                                      clean_up_tokenization_spaces=False)

    def _decode_step(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_EVERY:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text[len(prefix_text):]

    # --------------------------------------------------------- stop strings
    def _accept(self, new: str, final: bool) -> str:
        if not self._stops:
            return self._emit(new)
        if not new and not (final and self._held):
            return ""
        buf = self._held + new
        self._held = ""
        ctx = self._tail
        search = ctx + buf
        match = _first_completed(search, self._stops)
        if match is not None:
            start, stop = match
            cut = start + len(stop) if self._include_stop else start
            self.stopped = stop
            return self._emit(search[len(ctx):max(cut, len(ctx))])
        hold = 0 if (final or self._include_stop) else _stop_prefix_suffix(buf, self._stops)
        self._held = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[: len(buf) - hold])

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
            if self._max_stop > 1:
                self._tail = (self._tail + delta)[-(self._max_stop - 1):]
        return delta


def _first_completed(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop string whose first occurrence ends first
    (ties: the earlier start), or None."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        key = (start + len(stop), start, stop)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else (best[1], best[2])


def _stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
