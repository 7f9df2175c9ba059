"""``wait_for``: poll a condition until it holds or a deadline passes (tests of asynchronous work);
``pid_gone``: whether a process has exited (absent, or a zombie waiting to be reaped)."""

from __future__ import annotations

import time


def wait_for(cond, timeout_s: float = 30.0, interval_s: float = 0.1, show=None):
    """Call ``cond()`` every ``interval_s`` until it returns a truthy value (returned) or ``timeout_s`` passes.

    On timeout raise AssertionError, with ``show()`` appended when given (what the state was).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s" + (f": {show()}" if show else ""))


def pid_gone(pid: int) -> bool:
    """True when process ``pid`` no longer runs: /proc has no entry, or it is a zombie (Z) or dead (X)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
