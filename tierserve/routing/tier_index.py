"""Which replica can load which KV chunk from a lower tier (DRAM, disk, Redis): the router's view.

A lower-tier chunk (cache/tiers/connector.py) is ``chunk_blocks``
consecutive blocks; its key is the chained block hash of its *last* block, so
chunk ``j`` of a request is held iff the request's block hash
``hashes[(j + 1) * chunk_blocks - 1]`` is a held key, and a held key covers
the request's whole prefix of ``(j + 1) * chunk_blocks`` blocks (chunk
aligned). No chain needs to be stored: the chained hash already names the
prefix.

Holdings (``TierIndex``), fed by ``TierDiff``s from the replicas
(server/cache_reporter.py ``TierMirror``):

* ``dram`` and ``disk`` are per replica: replica -> set of keys. A replica
  reports what LMCache's own index holds (a snapshot diff), so LRU evictions
  in those tiers reach the router at the next report.
* ``redis`` is shared by every replica pointing at the same server: one
  cluster-wide key set that counts for *every* replica (a Redis hit is
  equally loadable everywhere). Replicas add the keys they put into Redis or
  loaded from it, and remove a key they looked up in Redis while Redis was
  reachable and did not find (Redis evicted or lost it). Redis evicts
  silently (``maxmemory`` policy, restart), so the set can be stale: it is
  bounded by ``max_redis_chunks`` (default 65536 keys, LRU by last report;
  older keys are forgotten first) and corrected by the first replica whose
  lookup misses the key. A stale key costs at most one mis-scored routing
  decision per chunk before a lookup removes it, and it adds the same
  ``0.3``-weighted blocks to every replica that reaches it.

Matching (``lower_tier_matches``, pure): for replica ``r`` with ``d`` device
blocks matched (prefix_tree.py), the connector would load chunks
``j = d // chunk_blocks, d // chunk_blocks + 1, ...`` each from the first
tier in the order dram > disk > redis that holds it, and stop at the first
chunk no tier holds (cache/tiers/connector.py ``match``). The blocks of chunk
``j`` beyond what is already covered (``(j + 1) * cb - max(d, j * cb)``) are
credited to the tier that serves it. The result ``{tier: {replica: blocks}}``
therefore never double counts a block: device blocks are counted once by the
policy at weight 1.0 and each lower-tier block once at its tier's weight
(routing/policy.py ``KV_TIER_WEIGHTS``). Example (cb = 16): replica A with
chunks 0 and 1 in DRAM scores 0.8 * 32 = 25.6 and beats B with 20 device
blocks (20.0); with 30 device blocks B wins. A chunk only in Redis adds the
same blocks to every replica that reaches it, so a Redis-only match ties all
replicas and load decides. Only whole chunks inside ``hashes`` count; the
connector always leaves the prompt's last token to compute, so a prompt that
ends exactly on a chunk boundary is over-credited by at most one block.

Tests: tests/test_tier_routing.py (exact matches and routing decisions for
hand-built holdings, a per-block brute-force reference on random holdings,
evictions, the Redis cap, TierMirror diffs, the tree actor body);
tests/test_tier_routing_connector.py (a real KVTierConnector with LMCache
DRAM/disk and a real redis-server reports what it holds, follows a DRAM
eviction and Redis misses); tests/test_tier_routing_serve.py (the router in
a real Serve app).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tierserve.cache.prefix_hash import HASH_BYTES
from tierserve.errors import InvalidParameterError

#: Lower tiers in lookup order (fastest first), as in cache/tiers/config.py TIER_ORDER.
LOWER_TIERS = ("dram", "disk", "redis")
#: Tiers held per replica; the rest (``redis``) are shared by every replica.
LOCAL_TIERS = ("dram", "disk")
SHARED_TIER = "redis"
#: Default bound of the cluster-wide Redis key set (module doc).
DEFAULT_MAX_REDIS_CHUNKS = 65536


@dataclass(frozen=True)
class TierDiff:
    """One replica's lower-tier change since its last report.

    ``added[tier]`` / ``evicted[tier]``: chunk keys (32-byte chained block
    hashes of each chunk's last block) the tier now holds / no longer holds.
    ``chunk_blocks`` is the connector's chunk length in blocks; every replica
    of a deployment must use the same one.
    """

    chunk_blocks: int
    added: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    evicted: Mapping[str, Sequence[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_blocks, int) or self.chunk_blocks < 1:
            raise InvalidParameterError("chunk_blocks", f"must be an int >= 1, got {self.chunk_blocks!r}")
        for name, part in (("added", self.added), ("evicted", self.evicted)):
            for tier, keys in part.items():
                if tier not in LOWER_TIERS:
                    raise InvalidParameterError(name, f"unknown tier {tier!r}; choose from {LOWER_TIERS}")
                for i, k in enumerate(keys):
                    if not isinstance(k, bytes) or len(k) != HASH_BYTES:
                        raise InvalidParameterError(name, f"{tier} key {i} must be {HASH_BYTES} bytes, got {k!r:.40}")

    def empty(self) -> bool:
        return not any(self.added.values()) and not any(self.evicted.values())


def lower_tier_matches(hashes: Sequence[bytes], device_matches: Mapping[str, int],
                       replica_ids: Iterable[str], holds, chunk_blocks: int,
                       tiers: Sequence[str] = LOWER_TIERS) -> dict[str, dict[str, int]]:
    """Per tier, per replica, the blocks that tier would serve after the device match (module doc).

    ``holds(tier, replica_id, key) -> bool``; replicas with no lower-tier
    blocks are omitted; tiers with no replica are omitted.
    """
    if chunk_blocks < 1:
        raise InvalidParameterError("chunk_blocks", f"must be >= 1, got {chunk_blocks}")
    out: dict[str, dict[str, int]] = {}
    n = len(hashes)
    for rid in replica_ids:
        covered = device_matches.get(rid, 0)
        j = covered // chunk_blocks
        while (j + 1) * chunk_blocks <= n:
            end = (j + 1) * chunk_blocks
            key = hashes[end - 1]
            tier = next((t for t in tiers if holds(t, rid, key)), None)
            if tier is None:
                break
            per = out.setdefault(tier, {})
            per[rid] = per.get(rid, 0) + end - covered
            covered = end
            j += 1
    return out


class TierIndex:
    """Lower-tier chunk holdings of every replica (dram/disk per replica, redis shared)."""

    def __init__(self, max_redis_chunks: int | None = DEFAULT_MAX_REDIS_CHUNKS):
        if max_redis_chunks is not None and max_redis_chunks < 1:
            raise InvalidParameterError("max_redis_chunks", f"must be >= 1 or None, got {max_redis_chunks}")
        self.max_redis_chunks = max_redis_chunks
        self.chunk_blocks: int | None = None
        self._local: dict[str, dict[str, set[bytes]]] = {t: {} for t in LOCAL_TIERS}
        self._redis: OrderedDict[bytes, None] = OrderedDict()

    def apply(self, replica_id: str, diff: TierDiff) -> None:
        """Apply one replica's diff: evictions first, then additions."""
        if not isinstance(replica_id, str) or not replica_id:
            raise InvalidParameterError("replica_id", f"must be a non-empty str, got {replica_id!r}")
        if self.chunk_blocks is None:
            self.chunk_blocks = diff.chunk_blocks
        elif diff.chunk_blocks != self.chunk_blocks:
            raise InvalidParameterError(
                "chunk_blocks", f"replica {replica_id} reports {diff.chunk_blocks}, the deployment uses "
                                f"{self.chunk_blocks}; all replicas must share one kv_chunk_blocks")
        for tier, keys in diff.evicted.items():
            if tier == SHARED_TIER:
                for k in keys:
                    self._redis.pop(k, None)
            else:
                held = self._local[tier].get(replica_id)
                if held is not None:
                    held.difference_update(keys)
                    if not held:
                        del self._local[tier][replica_id]
        for tier, keys in diff.added.items():
            if tier == SHARED_TIER:
                for k in keys:
                    self._redis[k] = None
                    self._redis.move_to_end(k)
                while self.max_redis_chunks is not None and len(self._redis) > self.max_redis_chunks:
                    self._redis.popitem(last=False)
            elif keys:
                self._local[tier].setdefault(replica_id, set()).update(keys)

    def drop_replica(self, replica_id: str) -> int:
        """Forget a replica's dram/disk chunks (shared Redis keys stay); returns how many."""
        return sum(len(per.pop(replica_id, ())) for per in self._local.values())

    def replicas(self) -> list[str]:
        """Replica ids holding at least one DRAM/disk chunk, sorted."""
        return sorted(set().union(*(per.keys() for per in self._local.values())))

    def holds(self, tier: str, replica_id: str, key: bytes) -> bool:
        if tier == SHARED_TIER:
            return key in self._redis
        return key in self._local[tier].get(replica_id, ())

    def num_chunks(self, tier: str, replica_id: str | None = None) -> int:
        """Chunks ``replica_id`` holds in a local tier, or the tier's distinct keys when None (redis: shared)."""
        if tier == SHARED_TIER:
            return len(self._redis)
        if replica_id is not None:
            return len(self._local[tier].get(replica_id, ()))
        return len(set().union(*self._local[tier].values())) if self._local[tier] else 0

    def match(self, hashes: Sequence[bytes], device_matches: Mapping[str, int],
              replica_ids: Iterable[str]) -> dict[str, dict[str, int]]:
        """``lower_tier_matches`` over this index ({} before any replica reported a tier)."""
        if self.chunk_blocks is None:
            return {}
        return lower_tier_matches(hashes, device_matches, replica_ids, self.holds, self.chunk_blocks)
