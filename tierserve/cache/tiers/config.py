"""KVTierConfig: which lower KV tiers an engine uses (DRAM, local disk, Redis) and their sizes.

The tiers hold whole KV *chunks* (``chunk_blocks`` consecutive full blocks of
one token prefix) below the engine's device pages; see
tierserve/cache/tiers/connector.py for the algorithm. ``tiers`` lists the
tiers in lookup order (empty: tiered store off); the order is always the
canonical one ``dram > disk > redis`` (faster first), whatever order the
caller wrote, so a lookup takes a chunk from the fastest tier that has it.
Each name is a backend in tiers/registry.py ``TIER_BACKENDS``.

Limits (checked in ``__post_init__``, errors name the field):

* ``tiers`` items in ``("dram", "disk", "redis")``, no duplicates;
* ``chunk_blocks >= 1`` (a chunk is ``chunk_blocks * block_size`` tokens; the
  default 16 blocks of 16 tokens = 256 tokens, LMCache's default chunk size);
* ``dram_gib > 0`` (the DRAM tier's LRU budget; LMCache's CPU buffer also
  stages disk and Redis transfers, so it is sized even without "dram");
* ``disk_gib > 0`` and ``disk_path`` set when "disk" is used;
* ``redis_url`` (``redis://host:port[/db]``) set when "redis" is used;
* ``redis_timeout_s > 0``: socket and connect timeout of every Redis call
  (default 0.5 s); a call slower than that counts as a Redis failure;
* ``redis_retry_s >= 0``: after a Redis failure the tier is skipped for this
  long (default 5 s) before it is tried again (a circuit breaker, so a dead
  Redis costs one timeout per ``redis_retry_s``, not one per chunk).

Pure data: no torch, no lmcache import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.errors import InvalidParameterError

#: Every tier, fastest first: the lookup order.
TIER_ORDER = ("dram", "disk", "redis")


@dataclass(frozen=True)
class KVTierConfig:
    # metadata: the option help and choices of CLI flags and Serve keys (tierserve/config_fields.py)
    tiers: tuple[str, ...] = field(default=(), metadata={"help": "lower KV tiers, e.g. dram,disk,redis (default: off)",
                                                         "choices": TIER_ORDER})
    chunk_blocks: int = field(default=16, metadata={"help": "KV blocks per stored chunk"})
    dram_gib: float = field(default=1.0, metadata={"help": "DRAM tier size (GiB)"})
    disk_gib: float = field(default=4.0, metadata={"help": "disk tier size (GiB)"})
    disk_path: str | None = field(default=None, metadata={"help": "disk tier folder"})
    redis_url: str | None = field(default=None, metadata={"help": "redis tier, redis://host:port shared by replicas"})
    redis_timeout_s: float = field(default=0.5, metadata={"help": "socket timeout of every Redis call (s)"})
    redis_retry_s: float = field(default=5.0, metadata={"help": "seconds a failed Redis tier is skipped"})

    def __post_init__(self) -> None:
        tiers = tuple(self.tiers)
        unknown = [t for t in tiers if t not in TIER_ORDER]
        if unknown:
            raise InvalidParameterError("kv_tiers", f"unknown tier {unknown[0]!r}; choose from {TIER_ORDER}")
        if len(set(tiers)) != len(tiers):
            raise InvalidParameterError("kv_tiers", f"lists a tier twice: {tiers}")
        object.__setattr__(self, "tiers", tuple(t for t in TIER_ORDER if t in tiers))
        if self.chunk_blocks < 1:
            raise InvalidParameterError("kv_chunk_blocks", f"must be >= 1, got {self.chunk_blocks}")
        if not self.dram_gib > 0:
            raise InvalidParameterError("kv_dram_gib", f"must be > 0, got {self.dram_gib}")
        if "disk" in self.tiers:
            if not self.disk_gib > 0:
                raise InvalidParameterError("kv_disk_gib", f"must be > 0, got {self.disk_gib}")
            if not self.disk_path:
                raise InvalidParameterError("kv_disk_path", "is required when the 'disk' tier is used")
        if "redis" in self.tiers:
            if not self.redis_url or not self.redis_url.startswith("redis://"):
                raise InvalidParameterError(
                    "kv_redis_url", f"must be a redis://host:port URL when the 'redis' tier is used, "
                                    f"got {self.redis_url!r}")
        if not self.redis_timeout_s > 0:
            raise InvalidParameterError("kv_redis_timeout_s", f"must be > 0, got {self.redis_timeout_s}")
        if not self.redis_retry_s >= 0:
            raise InvalidParameterError("kv_redis_retry_s", f"must be >= 0, got {self.redis_retry_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    @staticmethod
    def parse_tiers(text: str | None) -> tuple[str, ...]:
        """``"dram,disk,redis"`` -> ``("dram", "disk", "redis")`` (empty or None -> ())."""
        if not text:
            return ()
        return tuple(t.strip() for t in text.split(",") if t.strip())
