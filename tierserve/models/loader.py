"""load_model: build the right model class from a checkpoint and fill its weights.

Sources:

- a folder with ``config.json`` and safetensors weights, either sharded
  (``model.safetensors.index.json``: the shards its ``weight_map`` names, in sorted
  order) or unsharded (every ``*.safetensors`` file in the folder, sorted);
- a ``.gguf`` file: the engine's GGUF reader (``tierserve.models.gguf``, imported
  only on this path) gives an HF config dict and HF-named float32 tensors; with
  ``packed=True`` its Q4_0/Q4_1/Q8_0 matrices stay in their ggml blocks instead
  (``models/gguf/packed.py``: QuantizedLinear / QuantizedEmbedding modules).

Tensors stream one at a time (``safe_open(...).get_tensor``) and are cast while
being copied into the model's parameters, so a bf16 checkpoint loaded as fp32
never has a second full fp32 copy beside the model. With ``device`` (e.g.
``cuda``) the model is built on that device and each tensor is copied straight
into its device parameter (cast on the device), so a bf16 checkpoint served in
bf16 on a GPU is never materialised in fp32, nor as a whole model, on the host.
The packed GGUF path builds on the host and moves the packed model once. The model is returned in
eval mode with ``requires_grad`` off. Which checkpoint tensors may be skipped is
decided by the model class (``CausalLMBase.ignored_hf_suffixes``); anything else
unknown, missing or misshapen raises ModelLoadError (see ``base.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from tierserve.errors import ModelLoadError
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.base import CausalLMBase
from tierserve.models.registry import model_class

SOURCE_SAFETENSORS = "safetensors"
SOURCE_GGUF = "gguf"
_INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    model: CausalLMBase
    arch: ModelArchConfig
    hf_config: dict
    source: str  # SOURCE_SAFETENSORS or SOURCE_GGUF


def load_model(path: str, dtype: torch.dtype = torch.float32, packed: bool = False,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a safetensors folder or a .gguf file (see module docstring)."""
    path = os.fspath(path)
    if packed and not path.lower().endswith(".gguf"):
        raise ModelLoadError(f"packed=True keeps a .gguf file's ggml blocks; {path!r} is not a .gguf file "
                             f"(load a quantized folder with models.quantized_checkpoint.load_quantized)")
    if os.path.isdir(path):
        hf_config = _read_config(path)
        weights = _iter_safetensors(safetensors_files(path))
        source = SOURCE_SAFETENSORS
    elif os.path.isfile(path) and path.lower().endswith(".gguf"):
        from tierserve.models.gguf import gguf_to_hf_config, iter_gguf_hf_tensors, read_gguf

        gguf = read_gguf(path)
        hf_config = gguf_to_hf_config(gguf)
        weights = iter_gguf_hf_tensors(gguf)
        source = SOURCE_GGUF
    else:
        raise ModelLoadError(f"model path {path!r} is neither a folder with config.json and safetensors "
                             f"nor a .gguf file")
    arch = ModelArchConfig.from_hf(hf_config)
    device = torch.device(device)
    if packed:
        from tierserve.models.gguf.packed import load_gguf_packed

        model = model_class(arch.architecture)(arch, dtype)
        load_gguf_packed(model, gguf)
        model.to(device)
    else:
        with device:  # parameters are created on the device; each checkpoint tensor is copied into one
            model = model_class(arch.architecture)(arch, dtype)
        model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, arch=arch, hf_config=hf_config, source=source)


def _read_config(folder: str) -> dict:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"model folder {folder!r} has no config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path!r} is not valid JSON: {exc}") from exc


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: the index's shards, or every *.safetensors file."""
    index_path = os.path.join(folder, _INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise ModelLoadError(f"{index_path!r} names shard {missing[0]!r}, which is not in the folder")
    else:
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"model folder {folder!r} has no *.safetensors files")
    return [os.path.join(folder, n) for n in files]


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
