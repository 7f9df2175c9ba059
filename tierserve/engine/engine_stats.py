"""What the engine tells its callers about itself: typed snapshots for the server, the CLI and tests.

The server reads the engine only through ``LLMEngine`` methods returning these
dataclasses (and the subsystems' own stats dataclasses); it never touches the
engine's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineInfo:
    """Static facts of a running engine."""

    model_name: str
    max_model_len: int
    block_size: int
    num_blocks: int


@dataclass(frozen=True)
class EngineStats:
    """Live load and prefix-cache counters (tokens), read between or during steps."""

    running: int
    waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_queries: int
    prefix_hits: int
    #: prompt tokens of waiting and running requests not prefilled yet (Scheduler.num_pending_prefill_tokens)
    pending_prefill_tokens: int = 0
