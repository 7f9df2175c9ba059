"""The engine's KV tiers (DRAM/disk/Redis chunk store, tierserve/cache/tiers/), built from the config.

Chunk keys are prefixed by a tag of everything that changes KV besides the
tokens (model name, dtype, weight format, linear backend, KV layout, page
format), so engines share chunks only when their KV is identical. A KV storage
format (kv4, XQuant) stores its packed pages; an eviction method is refused.
"""

from __future__ import annotations

import hashlib

from tierserve.config import EngineConfig
from tierserve.errors import InvalidParameterError


def build_kv_tiers(config: EngineConfig, spec, source, dtype, kv_caches):
    """The chunk store over the runner's ``kv_caches``, or None when ``kv_tiers`` is off."""
    if not config.kv_tiers.enabled:
        return None
    kvc = config.kv_compression
    if kvc.evicts:
        raise InvalidParameterError("kv_tiers", f"cannot be combined with the KV eviction method in "
                                                f"{kvc.method!r}: a table with evicted blocks no longer maps to "
                                                f"token chunks (storage formats such as kv4 combine)")
    from tierserve.cache.tiers.connector import KVTierConnector

    m = config.model
    pages = f"{kvc.method}/g{kvc.group_size}/b{kvc.latent_bits}" if kvc.enabled else "plain"
    ident = f"{source.name}|{dtype}|{source.quantization}|{m.linear_backend}|{spec}|{pages}"
    return KVTierConnector(config.kv_tiers, spec, "tierserve-" + hashlib.sha256(ident.encode()).hexdigest()[:16],
                           kv_caches)
