"""Per-call timing of a kernel-sized function: warm-up calls, then the quantile of ``calls`` timed calls.

``call_ms(fn, calls, q, warmup)``: ``fn()`` runs ``warmup`` times untimed, then ``calls`` times, each timed
alone with ``time.perf_counter``; returns the ``q`` quantile (nearest rank from below: the value at index
``int(q * calls)`` of the sorted times, capped at the last) in milliseconds. A shared host's stalls land in
the upper tail, so benchmarks report the median (q = 0.5) or a low quantile (q = 0.1).
"""

from __future__ import annotations

import time


def call_ms(fn, calls: int, q: float = 0.5, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[min(int(q * calls), calls - 1)] * 1e3
