"""The tier registry: tier name -> TierBackend class, and the build of one connector's tiers.

``TIER_BACKENDS`` lists every tier fastest first; its names are
``KVTierConfig``'s ``TIER_ORDER`` (config.py validates names without
importing LMCache; tests/test_kv_tiers_backends.py checks the two agree).

``build_tiers`` turns a ``KVTierConfig`` into the shared ``LMCacheRuntime``
and the configured backends in lookup order: the base ``LMCacheOptions``
(chunk size, host buffer of ``dram_gib``) pass through each configured class's
``lmcache_options``, then the runtime is built and each class constructed as
``cls(runtime, config)``. If a backend fails to build, the runtime (its event
loop thread) is closed before the error propagates.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tierserve.cache.tiers.backend import TierBackend
from tierserve.cache.tiers.config import KVTierConfig
from tierserve.cache.tiers.disk import DiskBackend
from tierserve.cache.tiers.dram import DRAMBackend
from tierserve.cache.tiers.lmcache_runtime import LMCacheOptions, LMCacheRuntime
from tierserve.cache.tiers.redis import RedisBackend

TIER_BACKENDS: Mapping[str, type[TierBackend]] = MappingProxyType(
    {cls.name: cls for cls in (DRAMBackend, DiskBackend, RedisBackend)})


def build_tiers(config: KVTierConfig, model_tag: str, kv_dtype: str, chunk_tokens: int,
                kv_shape: tuple[int, int, int, int, int]) -> tuple[LMCacheRuntime, tuple[TierBackend, ...]]:
    """The runtime and the backends of ``config.tiers``, in lookup order (module doc)."""
    classes = [TIER_BACKENDS[name] for name in config.tiers]
    options = LMCacheOptions(chunk_tokens=chunk_tokens, cpu_gib=config.dram_gib)
    for cls in classes:
        options = cls.lmcache_options(options, config)
    runtime = LMCacheRuntime(options, model_tag, kv_dtype, kv_shape)
    backends: list[TierBackend] = []
    try:
        for cls in classes:
            backends.append(cls(runtime, config))
    except BaseException:
        for backend in backends:
            backend.close()
        runtime.close()
        raise
    return runtime, tuple(backends)
