"""LLM-aware autoscaling: size the LLMServer deployment on KV-cache usage, waiting requests and TTFT.

Ray Serve's default policy scales on ongoing requests per replica, which says
little about an LLM replica: 16 short chats and 16 long documents are the same
count, while the KV cache, the waiting queue and time to first token tell them
apart. ``LLMAutoscalingPolicy`` is a Ray Serve custom autoscaling policy
(``AutoscalingConfig(policy=AutoscalingPolicy(policy_function=
"tierserve.server.autoscaling:LLMAutoscalingPolicy", policy_kwargs={...}))``,
a class Serve instantiates once with ``policy_kwargs`` and calls every control
loop tick with an ``AutoscalingContext``). This module imports no Ray: the
context is read by attribute, and the decision is a pure function.

Signals. Each replica exports, through Serve's ``record_autoscaling_stats``
(server/worker.py), per tick: ``kv_usage`` (fraction of its KV blocks in use,
``EngineStats.kv_usage``), ``waiting`` (requests queued in its scheduler) and
``ttft_s`` (mean time to first token of the requests whose first token came
since its previous record, 0 when none did). These are the
``tierserve_kv_cache_usage``, ``tierserve_num_requests_waiting`` and
``tierserve_time_to_first_token_seconds`` series of server/metrics.py, read at
the replica. Serve averages each over ``look_back_period_s`` per replica
(``ctx.aggregated_metrics``).

Pressure (``pressure``), with the targets of ``AutoscaleTargets``::

    pressure = max(mean kv_usage / target_kv_usage,
                   mean waiting  / target_waiting,
                   mean ttft_s over replicas with ttft_s > 0 / target_ttft_s)

1.0 means "at target"; replicas that served no first token in the window do
not dilute the TTFT mean (an idle replica next to a slow one does not hide it).
Within one replica, Serve's look-back average does include its records with
no first token (0.0), so sparse traffic reads as less TTFT pressure than its
few requests saw; under sustained load every record has first tokens.

Decision (``decide``, pure; ``n`` = running replicas, whose signals these
are; ``t`` = Serve's current target, which differs from ``n`` while replicas
start or stop; ``[lo, hi]`` the bounds). The answer is a new target, and
"hold" answers ``t``, never ``n`` (answering ``n`` while new replicas start
would cancel them):

1. ``t`` outside ``[lo, hi]``: go to the nearest bound at once (no delay).
2. ``pressure > UPSCALE_AT`` (1.0): want ``min(hi, ceil(n * pressure))``, the
   count that brings the pressure back to target if load spreads evenly; only
   a want above ``t`` is a change (replicas already starting count).
3. ``pressure < DOWNSCALE_AT`` (0.5): want ``max(lo, t - 1)``: one replica at a
   time, since each removal drops a replica's warm prefix cache. Hysteresis
   (steady state, ``t = n``):
   with ``n - 1 >= 1`` replicas left, the KV and waiting terms (totals spread
   over one replica fewer) become ``n * p / (n - 1)``, which stays
   ``<= 1.0 = UPSCALE_AT`` for ``p < 0.5`` and every ``n >= 2``, so a
   scale-down does not trigger the next scale-up by itself. Between 0.5 and
   1.0 nothing changes.
4. Delays: a wanted change is applied only after it has been wanted in the
   same direction continuously for ``upscale_delay_s`` (up) or
   ``downscale_delay_s`` (down); a tick wanting the other direction, or no
   change, restarts the clock (``ScaleState``: direction and since when).
   Defaults 30 s up (about a replica's start: a shorter burst is over before a
   new replica serves) and 300 s down (keep capacity and warm caches through
   the lulls of bursty traffic).

Serve wraps every custom policy with its own delays (``AutoscalingConfig``
``upscale_delay_s`` / ``downscale_delay_s``) and bounds; the app sets Serve's
delays to 0 when this policy is on (server/app.py), so the delays here are the
only ones. No signal from any running replica (all starting): hold.

Tests (tests/test_autoscaling.py): pressure and every decision branch with
exact numbers, the delay clock (restart on direction change, exact expiry),
the hysteresis property over a grid, holding the target while new replicas
start, the Ray adapter on a hand-built context, and the app's autoscaling
config built from ``autoscaler: llm``; tests/test_autoscaling_serve.py runs
the policy in a real Serve deployment (a burst scales up, idleness down).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tierserve.errors import InvalidParameterError

#: Metric names a replica returns from ``record_autoscaling_stats`` (server/worker.py).
SIGNAL_KV_USAGE = "kv_usage"
SIGNAL_WAITING = "waiting"
SIGNAL_TTFT_S = "ttft_s"
SIGNALS = (SIGNAL_KV_USAGE, SIGNAL_WAITING, SIGNAL_TTFT_S)
#: Scale up above this pressure, down below the other (module doc, steps 2-3).
UPSCALE_AT = 1.0
DOWNSCALE_AT = 0.5
#: Keys of this policy's state inside Serve's ``policy_state`` (Serve keeps its own keys beside them).
_STATE_DIRECTION = "tierserve_scale_direction"
_STATE_SINCE = "tierserve_scale_since"
#: The import path Serve configs name.
POLICY_PATH = "tierserve.server.autoscaling:LLMAutoscalingPolicy"


@dataclass(frozen=True)
class AutoscaleTargets:
    """Per-replica targets and delays (module doc); validated, errors name the field."""

    target_kv_usage: float = 0.8
    target_waiting: float = 2.0
    target_ttft_s: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.target_kv_usage <= 1:
            raise InvalidParameterError("target_kv_usage", f"must lie in (0, 1], got {self.target_kv_usage}")
        for name in ("target_waiting", "target_ttft_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InvalidParameterError(name, f"must be finite and > 0, got {value}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidParameterError(name, f"must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class ReplicaSignals:
    """One replica's signals over the look-back window."""

    kv_usage: float
    waiting: float
    ttft_s: float


@dataclass(frozen=True)
class ScaleState:
    """The wanted direction (+1 up, -1 down, 0 none) and since when it has been wanted."""

    direction: int = 0
    since: float | None = None


def pressure(signals: Sequence[ReplicaSignals], targets: AutoscaleTargets) -> float:
    """Load against target, 1.0 = at target (module doc); 0.0 without signals."""
    if not signals:
        return 0.0
    n = len(signals)
    kv = sum(s.kv_usage for s in signals) / n / targets.target_kv_usage
    waiting = sum(s.waiting for s in signals) / n / targets.target_waiting
    served = [s.ttft_s for s in signals if s.ttft_s > 0]
    ttft = sum(served) / len(served) / targets.target_ttft_s if served else 0.0
    return max(kv, waiting, ttft)


def decide(signals: Sequence[ReplicaSignals], num_replicas: int, min_replicas: int, max_replicas: int,
           state: ScaleState, now: float, targets: AutoscaleTargets,
           target_replicas: int | None = None) -> tuple[int, ScaleState]:
    """The new target replica count and the next state (module doc, steps 1-4). Pure.

    ``num_replicas`` run and sent ``signals``; ``target_replicas`` is Serve's current target
    (default: ``num_replicas``, the steady state).
    """
    if not 0 <= min_replicas <= max_replicas:
        raise InvalidParameterError("min_replicas", f"must lie in [0, max_replicas={max_replicas}], got {min_replicas}")
    target = num_replicas if target_replicas is None else target_replicas
    if target < min_replicas or target > max_replicas:
        return min(max(target, min_replicas), max_replicas), ScaleState()
    if not signals:
        return target, ScaleState()
    p = pressure(signals, targets)
    want = target
    if p > UPSCALE_AT:
        want = max(target, min(max_replicas, math.ceil(num_replicas * p)))
    elif p < DOWNSCALE_AT:
        want = max(min_replicas, target - 1)
    if want == target:
        return target, ScaleState()
    direction = 1 if want > target else -1
    since = state.since if state.direction == direction and state.since is not None else now
    delay = targets.upscale_delay_s if direction > 0 else targets.downscale_delay_s
    if now - since >= delay:
        return want, ScaleState()
    return target, ScaleState(direction, since)


def signals_from_metrics(metrics: Mapping[str, Mapping[object, float]] | None,
                         replicas: Sequence[object]) -> list[ReplicaSignals]:
    """Signals of the ``replicas`` that reported all three metrics (Serve's ``aggregated_metrics``)."""
    if not metrics:
        return []
    out = []
    for rid in replicas:
        values = [metrics.get(name, {}).get(rid) for name in SIGNALS]
        if all(v is not None for v in values):
            out.append(ReplicaSignals(*(float(v) for v in values)))
    return out


class LLMAutoscalingPolicy:
    """Serve custom autoscaling policy (class form): ``policy_kwargs`` are ``AutoscaleTargets`` fields.

    ``__call__(ctx)`` returns ``(num_replicas, policy_state)`` as Serve expects;
    bounds are Serve's capacity-adjusted ``min_replicas`` / ``max_replicas``.
    """

    def __init__(self, **policy_kwargs):
        self.targets = AutoscaleTargets(**policy_kwargs)

    def __call__(self, ctx) -> tuple[int, dict]:
        state = ScaleState(ctx.policy_state.get(_STATE_DIRECTION, 0), ctx.policy_state.get(_STATE_SINCE))
        now = ctx.current_time if ctx.current_time is not None else time.time()
        signals = signals_from_metrics(ctx.aggregated_metrics, ctx.running_replicas)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        num, nxt = decide(signals, ctx.current_num_replicas, lo, hi, state, now, self.targets,
                          target_replicas=ctx.target_num_replicas)
        return num, {_STATE_DIRECTION: nxt.direction, _STATE_SINCE: nxt.since}
