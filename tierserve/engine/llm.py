"""LLM: offline batch generation over the step loop (vLLM's ``LLM`` shape)."""

from __future__ import annotations

from collections.abc import Sequence

from tierserve.config import (CacheConfig, EngineConfig, KVCompressionConfig, KVTierConfig, ModelConfig, OffloadConfig,
                              SchedulerConfig)
from tierserve.engine.llm_engine import LLMEngine
from tierserve.engine.outputs import CompletionOutput
from tierserve.sampling_params import SamplingParams


def build_engine_config(model: str | None = None, *, dtype: str = "float32",
                        max_model_len: int | None = None, block_size: int = 16,
                        num_blocks: int | None = None, kv_cache_memory_gib: float = 1.0,
                        enable_prefix_caching: bool = True, max_num_seqs: int = 64,
                        max_num_batched_tokens: int = 2048, long_prefill_token_threshold: int = 0,
                        num_threads: int | None = None, seed: int = 0,
                        linear_backend: str = "auto", quantization: str | None = None,
                        resident_experts: int | None = None, expert_hosts: int = 2,
                        kv_tiers: str | tuple[str, ...] = (), kv_dram_gib: float = 1.0, kv_disk_gib: float = 4.0,
                        kv_disk_path: str | None = None, kv_redis_url: str | None = None,
                        kv_chunk_blocks: int = 16, kv_compression: str = "none", kv_budget: int | None = None,
                        kv_ratio: float | None = None) -> EngineConfig:
    """The EngineConfig of the flat options shared by ``LLM``, the CLI and the Serve app builder.

    ``resident_experts`` (None: every expert resident) turns on MoE expert
    offload over ``expert_hosts`` ExpertHost actors (OffloadConfig).
    """
    return EngineConfig(
        model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                          linear_backend=linear_backend, quantization=quantization),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          kv_cache_memory_gib=kv_cache_memory_gib,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  long_prefill_token_threshold=long_prefill_token_threshold),
        offload=OffloadConfig(resident_experts=resident_experts, expert_hosts=expert_hosts),
        kv_tiers=KVTierConfig(  # [kv-tiers] "dram,disk,redis" or a tuple; () = off
            tiers=KVTierConfig.parse_tiers(kv_tiers) if isinstance(kv_tiers, str) else tuple(kv_tiers),
            chunk_blocks=kv_chunk_blocks, dram_gib=kv_dram_gib, disk_gib=kv_disk_gib, disk_path=kv_disk_path,
            redis_url=kv_redis_url),
        kv_compression=KVCompressionConfig(method=kv_compression, budget=kv_budget, ratio=kv_ratio),
        seed=seed, num_threads=num_threads)


class LLM:
    """``LLM(model=...).generate(prompts, params)``: all prompts run together, continuously batched."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kwargs):
        self.engine = LLMEngine(config or build_engine_config(model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results = {rid: _Collect(rid, self.engine.get_request(rid).prompt_token_ids) for rid in ids}
        while any(not r.finished for r in results.values()):
            for out in self.engine.step():
                results[out.request_id].add(out)
        return [results[rid].result() for rid in ids]


class _Collect:
    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id, self.prompt_ids = request_id, list(prompt_ids)
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.logprobs: list = []
        self.finished = False
        self.reason: str | None = None
        self.cached = 0

    def add(self, out) -> None:
        self.tokens.extend(out.new_token_ids)
        self.text.append(out.new_text)
        self.logprobs.extend(out.new_logprobs)
        self.cached = out.num_cached_tokens
        if out.finished:
            self.finished, self.reason = True, out.finish_reason

    def result(self) -> CompletionOutput:
        return CompletionOutput(self.request_id, self.prompt_ids, self.tokens, "".join(self.text),
                                self.reason, self.logprobs or None, self.cached)
