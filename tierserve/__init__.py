"""tierserve: serve large (MoE) language models on GPUs too small to hold them.

Public API: ``LLM``, ``SamplingParams``, ``EngineConfig``, ``AsyncLLMEngine``.
Heavy modules (torch, transformers) load on first use, not at import.
"""

from tierserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tierserve.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLMEngine", "SamplingParams", "EngineConfig", "ModelConfig", "CacheConfig",
           "SchedulerConfig"]


def __getattr__(name: str):
    if name == "LLM":
        from tierserve.engine.llm import LLM

        return LLM
    if name == "AsyncLLMEngine":
        from tierserve.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(f"module 'tierserve' has no attribute {name!r}")
