"""StoreLedger (tierserve/cache/tiers/store_ledger.py): pending KV chunk stores, exact order and states."""

from __future__ import annotations

import pytest

from tierserve.cache.tiers.store_ledger import StoreLedger


def test_pending_stores_complete_in_any_order_and_never_twice():
    ledger: StoreLedger[str] = StoreLedger()
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert ledger.issue(a, "ta") and ledger.issue(b, "tb")
    assert not ledger.issue(a, "again")  # a chunk is never copied twice at once
    assert ledger.pending(a) and ledger.pending(b) and not ledger.pending(c)
    assert ledger.oldest() == [a, b] and ledger.ticket(a) == "ta" and len(ledger) == 2
    assert ledger.issue(c, "tc") and ledger.max_pending == 3
    assert ledger.complete(b) == "tb"
    assert ledger.oldest() == [a, c] and not ledger.pending(b)
    with pytest.raises(ValueError, match="no store in flight"):
        ledger.complete(b)
    assert ledger.complete(a) == "ta" and ledger.complete(c) == "tc"
    assert (ledger.issued, ledger.completed, len(ledger), ledger.max_pending) == (3, 3, 0, 3)
    assert ledger.issue(a, "ta2") and ledger.oldest() == [a]  # stored again later: a new store
