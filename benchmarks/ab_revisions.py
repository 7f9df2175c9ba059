"""A/B of the same measurement across git revisions: each revision's ``tierserve`` in its own process.

``export(rev)`` writes the ``tierserve`` package of a commit (``git archive``, the repository's own
metadata untouched) to ``$TMPDIR/tierserve_ab/<sha>``, once per commit; ``rev="WORKTREE"`` is the
checkout as it stands, uncommitted edits included. ``Child`` starts one benchmark process per
revision with ``TIERSERVE_AB_SRC`` naming that package's parent folder (the benchmark puts it first
on ``sys.path``; the child reports the ``tierserve`` it imported, and the parent checks it), talks to
it over a line protocol (``run`` -> one float per line) and keeps it loaded between rounds, so both
revisions are measured in interleaved rounds on one warm model each (A B B A ...: a drift of the
machine's load between rounds lands on both sides alike).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_ENV = "TIERSERVE_AB_SRC"
WORKTREE = "WORKTREE"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def describe(rev: str) -> str:
    """``<short sha> <subject>`` of a revision (the worktree: HEAD's, marked)."""
    if rev == WORKTREE:
        dirty = bool(_git("status", "--porcelain", "--", "tierserve"))
        return f"worktree ({_git('log', '-1', '--format=%h', 'HEAD')}{' + edits' if dirty else ''})"
    return _git("log", "-1", "--format=%h %s", rev)[:72]


def export(rev: str) -> str:
    """A folder whose ``tierserve`` is the package at ``rev`` (the worktree for ``WORKTREE``)."""
    if rev == WORKTREE:
        return REPO
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    dest = os.path.join(tempfile.gettempdir(), "tierserve_ab", sha)
    if not os.path.isdir(os.path.join(dest, "tierserve")):
        tmp = dest + ".part"
        os.makedirs(tmp, exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", sha, "tierserve"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        os.replace(tmp, dest)
    return dest


class Child:
    """One benchmark process on one revision; ``args`` are the benchmark's own child arguments."""

    def __init__(self, rev: str, script: str, args: list[str]):
        self.rev, self.src = rev, export(rev)
        env = dict(os.environ, **{SRC_ENV: self.src})
        self.proc = subprocess.Popen([sys.executable, script, *args], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        imported = self._line()
        want = os.path.join(self.src, "tierserve")
        if os.path.dirname(imported) != want:
            self.close()
            raise RuntimeError(f"{rev}: the child imported {imported}, not {want}/__init__.py")
        self.info = self._line()  # the child's load line (load seconds etc.)

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark child on {self.rev} exited (code {self.proc.wait()})")
        return line.strip()

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def interleaved(n: int, k: int) -> list[list[int]]:
    """Round orders for ``k`` sides over ``n`` rounds: forward, backward, forward... (A B, B A, A B ...)."""
    return [list(range(k)) if r % 2 == 0 else list(range(k))[::-1] for r in range(n)]


def child_main(setup) -> None:
    """The child side: report the imported tierserve, ``setup() -> (load line, serve_one)``, then answer
    ``serve_one(command)`` per stdin line."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import tierserve

    proto.write(tierserve.__file__ + "\n")
    info, serve_one = setup()
    proto.write(info + "\n")
    for line in sys.stdin:
        proto.write(serve_one(line.strip()) + "\n")
