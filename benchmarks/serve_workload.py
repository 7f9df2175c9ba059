"""The multi-turn chat workload of benchmarks/serve.py (see its docstring): conversations over long
Austen system prompts, seeded questions and seeded think times, identical for every router."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tierserve.data.austen import austen_texts

QUESTIONS = (
    "Who are the main characters in the passage above? Answer in one sentence.",
    "What is the mood of the passage? Answer briefly.",
    "Quote one phrase from the passage that you find striking.",
    "What happens next, in your opinion? One sentence.",
    "Which character speaks first in the passage?",
    "Describe the setting of the passage in a few words.",
    "What does the narrator think of the characters?",
    "Summarize the passage in ten words.",
)


@dataclass(frozen=True)
class Conversation:
    system: str
    questions: tuple[str, ...]
    think_s: tuple[float, ...]  # the user's pause before each turn after the first



def system_prompts(n: int, passage_chars: int) -> list[str]:
    """``n`` distinct system prompts: an instruction plus an Austen passage (novel ``i mod 6``)."""
    texts = austen_texts()
    novels = sorted(texts)
    prompts = []
    for i in range(n):
        novel = novels[i % len(novels)]
        text = texts[novel]
        start = text.find("\n\n", 20_000 + 60_000 * (i // len(novels))) + 2
        passage = re.sub(r"\s+", " ", text[start:start + passage_chars]).strip()
        prompts.append(f"You are a helpful literary assistant. Answer questions about this passage from "
                       f"{novel} by Jane Austen.\n\n{passage}")
    return prompts


def build_workload(n_conv: int, n_prompts: int, turns: int, passage_chars: int, think_s: float,
                   seed: int) -> list[Conversation]:
    """Deterministic conversations: conversation i uses system prompt ``i mod n_prompts``, seeded questions
    and seeded think times (exponential, mean ``think_s``)."""
    prompts = system_prompts(n_prompts, passage_chars)
    rng = random.Random(seed)
    return [Conversation(prompts[i % n_prompts], tuple(rng.sample(QUESTIONS, turns)),
                         tuple(rng.expovariate(1 / think_s) if think_s > 0 else 0.0 for _ in range(turns - 1)))
            for i in range(n_conv)]


def working_set_blocks(workload: list[Conversation], tokenizer, max_tokens: int, block_size: int = 16) -> int:
    """KV blocks that hold the whole workload at once: every distinct system prompt once, plus every
    conversation's own history (its questions with the chat template's framing, and ``max_tokens`` per
    reply, the most a reply can add). An estimate for sizing the cache against the workload (replies that
    stop early make it smaller); prompts and histories are counted in whole blocks, as the cache stores them."""
    def n_tokens(messages: list[dict], generation_prompt: bool) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tokenizer.encode(text, add_special_tokens=False))

    blocks = 0
    prompt_tokens: dict[str, int] = {}
    for conv in workload:
        if conv.system not in prompt_tokens:
            prompt_tokens[conv.system] = n_tokens([{"role": "system", "content": conv.system}], False)
            blocks += prompt_tokens[conv.system] // block_size  # full blocks are shared; the tail is not
        messages = [{"role": "system", "content": conv.system}]
        for question in conv.questions:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        own = n_tokens(messages, False) - prompt_tokens[conv.system] + len(conv.questions) * max_tokens
        blocks += -(-(prompt_tokens[conv.system] % block_size + own) // block_size)
    return blocks
