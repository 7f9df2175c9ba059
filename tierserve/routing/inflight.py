"""Prefixes in flight: what a router sent where, until the replica's cache report catches up.

The prefix tree (routing/tree_actor.py) learns a replica's blocks from the replica's own reports, after the
request that brought them was queued, prefilled and the next report went out. A request that shares a prompt
with one routed a moment ago and arrives inside that window sees no match anywhere; ranked by load, with the
tie-break that spreads cold requests over idle replicas, it goes to another replica, which prefills the same
prompt again and then caches it too. Measured (benchmarks/serve_results.md, four conversations per prompt,
16 conversations): 5-10 of the 16 first turns were cold under Router v2 where 4 (one per prompt) need be.

``InflightPrefixes`` closes the window inside one router: it remembers, per replica, the block hashes of the
requests the router sent there during the last ``ttl_s`` seconds, and ``match`` returns each replica's
leading run of them: the blocks that replica will hold once those requests are scheduled. The router takes,
per replica, the larger of the tree's device match and this one. A follower sent to the same replica reuses
the blocks as soon as the first request is scheduled: the engine registers a block in its prefix cache when
it schedules the block's tokens and looks prefixes up when it admits a request
(cache/kv_cache_manager.py), so even a follower admitted in the very next step hits.

Expiry and bounds:

* ``ttl_s`` (default 10 s): long enough to cover a queue wait, the prefill and a report under load (TTFT
  p95 was 3-6 s in those runs); after it the entry is dropped and the tree alone speaks for the replica
  (it has the report by then, or the blocks were never cached: the request was rejected or failed, or
  evicted since). Until then an eviction on the replica is not seen: the match is an estimate, used only
  to rank replicas, never for correctness. ``ttl_s = 0`` turns the tracking off.
* ``max_hashes`` (default 65536 entries over all replicas, ~1M tokens of 16-token blocks): past it the oldest
  entries go first. Recording a hash again refreshes its expiry.

``merge_matches`` combines the two: per replica the larger device match, and each lower tier's blocks after
the tree's device match shortened by what the in-flight match now covers (a lower tier serves the blocks
after the device match, routing/tier_index.py).

Bookkeeping only (no Ray, no torch); time is passed in (``now``, seconds on one monotonic clock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from tierserve.errors import InvalidParameterError

DEFAULT_TTL_S = 10.0
DEFAULT_MAX_HASHES = 65536


class InflightPrefixes:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        if not ttl_s >= 0:
            raise InvalidParameterError("inflight_ttl_s", f"must be >= 0 seconds, got {ttl_s}")
        if isinstance(max_hashes, bool) or not isinstance(max_hashes, int) or max_hashes < 1:
            raise InvalidParameterError("inflight_max_hashes", f"must be an integer >= 1, got {max_hashes!r}")
        self.ttl_s = float(ttl_s)
        self.max_hashes = max_hashes
        # (replica id, block hash) -> expiry; insertion order is expiry order (one ttl, a monotonic clock)
        self._expiry: OrderedDict[tuple[str, bytes], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def record(self, replica_id: str, hashes: Sequence[bytes], now: float) -> None:
        """The router sent a request with these chained block hashes to ``replica_id`` at ``now``."""
        if self.ttl_s == 0:
            return
        self._expire(now)
        expiry = now + self.ttl_s
        for h in hashes:
            key = (replica_id, h)
            self._expiry[key] = expiry
            self._expiry.move_to_end(key)
        while len(self._expiry) > self.max_hashes:
            self._expiry.popitem(last=False)

    def match(self, hashes: Sequence[bytes], replica_ids: Iterable[str], now: float) -> dict[str, int]:
        """Replica -> leading blocks of ``hashes`` recorded for it and not expired (replicas with none left out)."""
        self._expire(now)
        out: dict[str, int] = {}
        for rid in replica_ids:
            n = 0
            while n < len(hashes) and self._expiry.get((rid, hashes[n]), now) > now:
                n += 1
            if n:
                out[rid] = n
        return out

    def forget(self, replica_id: str) -> int:
        """Drop every entry of a replica (it died); returns how many."""
        keys = [k for k in self._expiry if k[0] == replica_id]
        for k in keys:
            del self._expiry[k]
        return len(keys)

    def _expire(self, now: float) -> None:
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[key]


def merge_matches(device: Mapping[str, int], lower: Mapping[str, Mapping[str, int]],
                  inflight: Mapping[str, int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(device, lower) of the tree's match with the in-flight match folded in (module doc)."""
    merged = dict(device)
    for rid, n in inflight.items():
        merged[rid] = max(n, merged.get(rid, 0))
    tiers: dict[str, dict[str, int]] = {}
    for tier, per_replica in lower.items():
        kept = {rid: left for rid, blocks in per_replica.items()
                if (left := device.get(rid, 0) + blocks - merged.get(rid, 0)) > 0}
        if kept:
            tiers[tier] = kept
    return merged, tiers
