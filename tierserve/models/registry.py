"""HF ``architectures[0]`` -> model class (a plain dict; add an entry to support a new one)."""

from __future__ import annotations

from tierserve.errors import ModelLoadError
from tierserve.models.base import CausalLMBase
from tierserve.models.gemma3 import Gemma3ForCausalLM
from tierserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from tierserve.models.mixtral import MixtralForCausalLM
from tierserve.models.olmoe import OlmoeForCausalLM
from tierserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLMBase]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def model_class(architecture: str) -> type[CausalLMBase]:
    """The class for an HF architecture name; ModelLoadError naming it and the supported ones otherwise."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(f"architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(supported_architectures())}") from None
