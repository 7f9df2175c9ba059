"""KVTierStats: the tiered KV store's counters (plain numbers, picklable, no torch).

Per tier (``"dram"``, ``"disk"``, ``"redis"``): chunks served (``hits``) and
their tokens, bytes loaded from and stored to the tier, chunks rejected by
their checksum (``corrupt``), and ``failures``: failed or timed-out tier
calls and writes (for Redis each opens the circuit breaker), plus the chunks
the connector could not build a record for (no free buffer, an error) and so
did not store in that tier (connector.py, Store). ``lookups`` counts
admissions that asked the tiers; ``load_seconds`` is the time spent fetching,
verifying and copying chunks into the KV pages. ``add`` sums replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_PER_TIER = ("hits", "hit_tokens", "bytes_loaded", "bytes_stored", "corrupt", "failures")


@dataclass
class KVTierStats:
    hits: dict[str, int] = field(default_factory=dict)
    hit_tokens: dict[str, int] = field(default_factory=dict)
    bytes_loaded: dict[str, int] = field(default_factory=dict)
    bytes_stored: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    lookups: int = 0
    load_seconds: float = 0.0

    def add(self, other: KVTierStats) -> None:
        for name in _PER_TIER:
            mine = getattr(self, name)
            for tier, v in getattr(other, name).items():
                mine[tier] = mine.get(tier, 0) + v
        self.lookups += other.lookups
        self.load_seconds += other.load_seconds
