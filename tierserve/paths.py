"""Where tierserve keeps what it derives on disk: converted models, the text corpus, packages' private copies.

``cache_root(cache_dir)`` is ``<cache_dir or $XDG_CACHE_HOME or ~/.cache>/tierserve``; every cache
path of the project is a folder below it. Nothing here creates a folder: callers make what they write.
"""

from __future__ import annotations

import os


def cache_root(cache_dir: str | None = None) -> str:
    """``<cache_dir or $XDG_CACHE_HOME or ~/.cache>/tierserve``."""
    base = cache_dir or os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tierserve")
