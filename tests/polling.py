"""``wait_for``: poll a condition until it holds or a deadline passes (tests of asynchronous work);
``pid_gone``: whether a process has exited (absent, or a zombie waiting to be reaped);
``pid_stopped``: whether every thread of a process has entered the stopped state (after SIGSTOP)."""

from __future__ import annotations

import os
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


def pid_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is stopped (state T in /proc/PID/task/TID/stat).

    ``kill(SIGSTOP)`` returns before the stop takes effect: a thread of a busy machine that is not
    scheduled yet may still read from a socket and answer a request, so a test that needs the process
    frozen waits for this first.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().split(")")[-1].split()[0] not in ("T", "t"):
                    return False
        except FileNotFoundError:
            continue  # the thread exited meanwhile
    return bool(tids)
