"""The working-set arithmetic of benchmarks/serve_workload.py (``--cache-fraction`` of benchmarks/serve.py sizes
the KV cache by it), on the served model's own tokenizer: exact block counts."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from serve_workload import Conversation, build_workload, working_set_blocks  # noqa: E402

from tierserve.engine.model_source import load_tokenizer, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def test_each_reply_token_budget_adds_whole_blocks(tokenizer):
    work = build_workload(4, 2, 3, 1200, 0.0, seed=5)
    base = working_set_blocks(work, tokenizer, 16)
    # 16 more tokens per reply: 3 turns x 16 tokens = exactly 3 more blocks per conversation
    assert working_set_blocks(work, tokenizer, 32) - base == 4 * 3


def test_shared_prompt_counted_once(tokenizer):
    c0, c1 = build_workload(2, 2, 2, 1200, 0.0, seed=1)  # two conversations on two distinct prompts
    assert c0.system != c1.system
    ws = lambda convs: working_set_blocks(convs, tokenizer, 8)  # noqa: E731
    assert ws([c0, c1]) == ws([c0]) + ws([c1])  # nothing shared
    n0 = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": c0.system}],
                                                            tokenize=False), add_special_tokens=False))
    # the same conversation twice: its prompt's full blocks once, its own blocks (with the prompt's partial
    # last block) twice
    assert n0 // 16 > 0 and ws([c0, c0]) == 2 * ws([c0]) - n0 // 16
