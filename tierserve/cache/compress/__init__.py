"""KV-cache compression: 4-bit KV storage and block eviction (PagedEviction, Expected Attention, StreamingLLM).

Pick one through ``tierserve.cache.compress.base.build_compressor`` (the
``KV_COMPRESSORS`` registry); see each module's docstring for its method.
"""
