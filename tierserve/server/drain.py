"""Drain on shutdown: stop admitting, let in-flight requests finish within a grace period.

``tierserve serve`` turns SIGTERM into KeyboardInterrupt (``raise_interrupt``),
as Ctrl-C already is, and then calls ``drain_app``: the app's ingress
(server/ingress.py ``OpenAIIngress.drain``) answers every new generation
request with 503 (``Retry-After``) while the admitted ones go on; ``drain_app``
polls the ingress's in-flight count every ``POLL_S`` seconds until it is 0
or ``timeout_s`` has passed, and returns what is left (0: a clean drain).
The caller then stops Serve and Ray, which ends every process Ray started.

The embedded server has one ingress replica, which sees every request; the
handle call reaches that replica.
"""

from __future__ import annotations

import logging
import time

from ray import serve

#: Seconds between two in-flight polls while draining.
POLL_S = 0.2

log = logging.getLogger(__name__)


def raise_interrupt(signum, frame) -> None:
    """Signal handler: SIGTERM ends ``serve``'s wait like Ctrl-C does."""
    raise KeyboardInterrupt


def drain_app(app_name: str, timeout_s: float) -> int:
    """Stop app ``app_name`` admitting and wait up to ``timeout_s`` for its in-flight requests; returns those left."""
    try:
        ingress = serve.get_app_handle(app_name)
        left = ingress.drain.remote().result(timeout_s=max(timeout_s, 5.0))
    except Exception as exc:  # not deployed yet (interrupted during start-up), or already gone
        log.warning("drain of %s skipped: %s", app_name, exc)
        return 0
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = ingress.in_flight.remote().result(timeout_s=max(timeout_s, 5.0))
    return left
