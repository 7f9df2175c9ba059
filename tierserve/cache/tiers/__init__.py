"""Lower KV tiers below the device pages: DRAM, local disk and Redis chunk stores over LMCache's backends.

* ``config``: ``KVTierConfig`` (which tiers, chunk length, sizes, Redis timeouts); pure data.
* ``chunk``: chunk keys and the self-checking chunk record (no torch).
* ``backend``: the ``TierBackend`` contract; ``dram``, ``disk``, ``redis`` implement it over LMCache
  (``lmcache_runtime``: what they share); ``registry``: tier name -> backend class.
* ``connector``: ``KVTierConnector``, the engine's step hook and the scheduler's external prefix source.
* ``stats``: ``KVTierStats`` counters.

Nothing is imported here: ``config`` is read by the engine config without loading torch or LMCache.
"""
