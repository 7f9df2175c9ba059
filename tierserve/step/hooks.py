"""The step-hook contract: how optional subsystems join the engine's step loop.

KV tiers (DRAM/disk/Redis chunk store), KV eviction and expert offload each
implement ``StepHook``; ``LLMEngine`` holds a list of them (built from the
config, in a fixed order) and calls every hook at the same points of every
step. ``step()`` reads: schedule, hooks, run, hooks, postprocess; it has no
branch per subsystem. Hooks never reach into the engine: what a call needs
(the step's schedule, the live requests) is passed to it, and what a hook
needs for its whole life (KV pages, the KV cache manager, the runner's block
tables) it receives when it is built.

Order of calls in one ``LLMEngine.step``:

1. ``schedule()`` decides the step (``SchedulerOutput``); preempted requests
   have already lost their blocks.
2. ``before_forward(sched, requests)`` on every hook, in list order: e.g. the
   KV tiers copy chunks fetched at admission into the blocks the scheduler
   allocated for them.
3. The forward pass (``ModelRunner.execute``): the step's K/V land in the pages.
4. ``after_forward(sched, requests)`` on every hook: e.g. the tiers store the
   chunks of prompts whose prefill completed; eviction drops blocks.
5. Sampling and stop rules. For each request that finished this step:
   ``on_finish(request)`` while its blocks are still held (store its KV),
   then ``on_release(request_id)`` after the scheduler freed it.
   An aborted request gets ``on_release`` only.
6. ``at_request_boundary()`` once, after a step in which at least one
   request finished (expert promotions happen here, never inside a step).

``close()`` releases what the hook started outside the engine (threads,
processes, remote hosts); the engine calls it once from ``LLMEngine.close``.

Every method has a no-op default: a hook overrides what it uses.
``stats()`` returns the hook's typed stats dataclass (or None); the engine
facade exposes them to the server by type, not by attribute access.

It lives below the engine (tierserve/step/) so that the KV tiers and eviction (cache/) and expert
offload (offload/) implement it without importing the engine.

Tests: tests/test_engine_hooks.py (a hook recording its calls sees exactly
the order above across finish, abort and preemption; a failing hook call
surfaces as the step's error) and every subsystem's own tests through the
engine.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from typing import Protocol

from tierserve.step.request_view import RequestView as Request
from tierserve.step.schedule import SchedulerOutput


class StepHook(ABC):
    """A subsystem that takes part in every engine step (see the module docstring for the call order)."""

    def before_forward(self, sched: SchedulerOutput, requests: Mapping[str, Request]) -> None:
        """After ``schedule()``, before the forward pass."""

    def after_forward(self, sched: SchedulerOutput, requests: Mapping[str, Request]) -> None:
        """After the forward pass wrote the step's K/V, before sampling."""

    def on_finish(self, request: Request) -> None:
        """A request finished normally; its blocks and KV are still intact."""

    def on_release(self, request_id: str) -> None:
        """A request left the engine (finished or aborted): drop any per-request state."""

    def at_request_boundary(self) -> None:
        """Between steps, after a step in which at least one request finished."""

    def stats(self) -> object | None:
        """The hook's stats dataclass, or None if it keeps none."""
        return None

    def close(self) -> None:
        """Release threads, processes and remote resources; called once."""


class ExternalPrefixSource(Protocol):
    """The scheduler side of a KV store outside the device pages (vLLM's connector split).

    ``match(request, num_device_hit)``: how many tokens after the device
    prefix hit the store can serve (whole chunks; at least one token of the
    request is always left to compute); 0 for none. Called once when the
    scheduler admits the request; it may fetch and verify the data then.
    ``commit(request, num_device_hit, num_external)``: the scheduler
    allocated blocks for those tokens and marked them computed; the store
    copies their KV in at the next ``before_forward``.
    """

    def match(self, request: Request, num_device_hit: int) -> int: ...

    def commit(self, request: Request, num_device_hit: int, num_external: int) -> None: ...
