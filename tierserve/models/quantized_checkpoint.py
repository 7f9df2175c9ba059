"""Quantized checkpoints on disk: ``save_quantized`` / ``load_quantized``, and how the engine picks one.

(The ``tierserve quantize`` command that writes them from a float checkpoint is tierserve/tools/quantize.py.)

A quantized folder holds
- ``model.safetensors``: the model's state dict under tierserve module names
  (not HF names, since fused projections such as ``qkv_proj`` are quantized as
  one matrix): packed tensors of a quantized module under ``<module>.<key>``
  (e.g. ``layers.0.self_attn.qkv_proj.blocks``, plus ``<module>.bias`` when the
  linear has one), every other parameter as-is (``layers.0.input_layernorm.weight``).
  A tensor registered under two names (an untied ``lm_head`` is also
  ``logits_head``) is stored once, under its first name.
- ``config.json``: the HF config the model is built from.
- ``quantization_config.json``: ``{"scheme", "options", "modules": {name:
  {"format", "shape": [out, in], "meta"}}, "source"}``, plus
  ``"kv_compression"`` when the scheme's format names the KV format it is
  served with (``offq``: ``"kv4"``; the engine serves it so unless ``kv_compression`` is set). ``source``
  holds the shape-defining fields of the model it was made from
  (``SOURCE_FIELDS`` of its ModelArchConfig); ``load_quantized`` refuses a
  folder whose config.json describes another model (ModelLoadError naming the
  field, the config's value and the recorded one; folders written before the
  record existed have none and are not checked).
- tokenizer files copied from the source folder when ``save_quantized`` is given one.

``load_quantized(folder, dtype)`` builds the model from config.json, swaps each
listed module for a ``QuantizedLinear`` of its packed tensors and loads the rest.
A module whose format is the config's scheme gets that format built with the
config's ``options`` (sigmascale cannot be built without ``rank``/``keep_ratio``);
any other listed format is built with its defaults.
Every mismatch raises ModelLoadError naming the tensor and the rule: an unknown
scheme or module format, a listed module the model lacks or that is not a
linear, a missing or unexpected tensor, a packed tensor whose shape/dtype is not
what the format stores for that weight shape (checked when the format defines
``expected_tensors(shape, meta) -> {key: (shape, dtype)}``; the ggml formats do),
or an unquantized tensor of the wrong shape.

``load_for_engine(path, dtype, quantization)`` is what ``ModelConfig.quantization``
means: None loads as before; ``"auto"`` loads a folder with
quantization_config.json quantized, a .gguf packed (its Q4_0/Q4_1/Q8_0 tensors
stay in their ggml blocks, see ``models/gguf/packed.py``), anything else plain;
a scheme name requires a quantized folder of that scheme, or quantizes a plain
folder at load time with ``quantize_model`` (default skip: embeddings, LM head).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tierserve.errors import InvalidParameterError, ModelLoadError
from tierserve.kernels.quant.base import WEIGHT_FORMATS, PackedWeight, QuantizedLinear, get_format
from tierserve.kernels.quant.embedding import QuantizedEmbedding
from tierserve.kernels.quant.transform import quantize_model, swap_module
from tierserve.models.arch_config import ModelArchConfig
from tierserve.models.loader import LoadedModel, load_model
from tierserve.models.registry import model_class

QUANT_CONFIG_FILE = "quantization_config.json"
SOURCE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "moe_intermediate_size")
WEIGHTS_FILE = "model.safetensors"
_NOT_COPIED = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach().contiguous()
    return out


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear | QuantizedEmbedding]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def save_quantized(model: nn.Module, hf_config: dict, out_dir: str, scheme: str, options: dict,
                   tokenizer_from: str | None = None, calibration: dict | None = None) -> None:
    """Write ``model`` (already transformed by ``quantize_model``) as a quantized folder.

    ``calibration`` (e.g. ``{"novels", "windows", "seq_len"}``), when given, is recorded as is in the
    quantization config under ``"calibration"``.
    """
    os.makedirs(out_dir, exist_ok=True)
    modules, seen = {}, set()
    for name, m in quantized_modules(model).items():
        ids = {id(t) for t in m.packed().tensors.values()}
        if ids <= seen:  # a tied head over the embedding's buffers: rebuilt from the embedding on load
            continue
        seen |= ids
        modules[name] = {"format": m.fmt.name, "shape": list(m.packed().shape), "meta": dict(m.meta)}
    save_file(_unique_state(model), os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, QUANT_CONFIG_FILE), "w", encoding="utf-8") as f:
        record = {"scheme": scheme, "options": dict(options), "modules": modules,
                  "source": source_record(ModelArchConfig.from_hf(hf_config))}
        kv = getattr(WEIGHT_FORMATS.get(scheme), "kv_compression", None)
        if kv is not None:
            record["kv_compression"] = kv
        if calibration is not None:
            record["calibration"] = dict(calibration)
        json.dump(record, f, indent=2)
    if tokenizer_from and os.path.isdir(tokenizer_from):
        for name in os.listdir(tokenizer_from):
            src = os.path.join(tokenizer_from, name)
            if (os.path.isfile(src) and not name.endswith(_NOT_COPIED) and name not in ("config.json", QUANT_CONFIG_FILE)
                    and not name.endswith(".index.json")):
                shutil.copyfile(src, os.path.join(out_dir, name))


def source_record(arch: ModelArchConfig) -> dict:
    """The shape-defining fields of a model (``SOURCE_FIELDS``), as recorded in a quantized folder."""
    return {f: getattr(arch, f) for f in SOURCE_FIELDS}


def check_source(folder: str, qcfg: dict, arch: ModelArchConfig) -> None:
    """ModelLoadError if the folder's config.json is not the model the checkpoint was made from."""
    recorded = qcfg.get("source")
    if recorded is None:
        return
    here = source_record(arch)
    for field, want in recorded.items():
        if here.get(field, want) != want:
            raise ModelLoadError(f"{folder}: config.json has {field} = {here[field]!r} but this {qcfg['scheme']} "
                                 f"checkpoint was made from a model with {field} = {want!r}; its quantized "
                                 f"weights do not belong to this model")


def checkpoint_kv_format(path: str) -> str | None:
    """The KV format a quantized checkpoint folder is served with (its ``"kv_compression"``), or None."""
    if not os.path.isdir(path):
        return None
    return (read_quant_config(path) or {}).get("kv_compression") or None


def read_quant_config(folder: str) -> dict | None:
    path = os.path.join(folder, QUANT_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path!r} is not valid JSON: {exc}") from exc
    for key, kind in (("scheme", str), ("options", dict), ("modules", dict)):
        if not isinstance(cfg.get(key), kind):
            raise ModelLoadError(f"{path!r}: field {key!r} must be a {kind.__name__}, got {cfg.get(key)!r}")
    return cfg


def _module_format(fmt_name: str, qcfg: dict):
    """The format a listed module was written with: built with the config's options when it is the scheme's."""
    options = qcfg["options"] if fmt_name == qcfg["scheme"] else {}
    try:
        return get_format(fmt_name, **options)
    except TypeError as exc:
        raise ModelLoadError(f"{QUANT_CONFIG_FILE}: format {fmt_name!r} rejects options {options}: {exc}") from exc


def _packed_for(name: str, spec: dict, tensors: dict[str, torch.Tensor], qcfg: dict) -> PackedWeight:
    fmt_name = spec.get("format")
    if fmt_name not in WEIGHT_FORMATS:
        raise ModelLoadError(f"module {name!r}: unknown weight format {fmt_name!r}; known: {sorted(WEIGHT_FORMATS)}")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ModelLoadError(f"module {name!r}: shape must be [out, in] positive ints, got {shape!r}")
    meta = dict(spec.get("meta") or {})
    prefix = name + "."
    keys = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
    keys.pop("bias", None)
    if not keys:
        raise ModelLoadError(f"module {name!r} is listed as {fmt_name} but the checkpoint has no {prefix}* tensors")
    fmt = _module_format(fmt_name, qcfg)
    expected = getattr(fmt, "expected_tensors", None)
    if expected is not None:
        want = expected(tuple(shape), meta)
        for key in sorted(set(want) | set(keys)):
            if key not in keys:
                raise ModelLoadError(f"tensor {prefix + key!r} is missing: format {fmt_name} stores it for a "
                                     f"{shape} weight")
            if key not in want:
                raise ModelLoadError(f"tensor {prefix + key!r} is unexpected: format {fmt_name} stores only "
                                     f"{sorted(want)}")
            w_shape, w_dtype = want[key]
            t = keys[key]
            if tuple(t.shape) != tuple(w_shape) or t.dtype != w_dtype:
                raise ModelLoadError(f"tensor {prefix + key!r} is {t.dtype} {list(t.shape)} but format {fmt_name} "
                                     f"stores {w_dtype} {list(w_shape)} for a {shape} weight")
    return PackedWeight(fmt_name, (shape[0], shape[1]), keys, meta)


def _swap_in(model: nn.Module, name: str, packed: PackedWeight, tensors: dict, dtype: torch.dtype,
             qcfg: dict) -> None:
    modules = dict(model.named_modules())
    old = modules.get(name)
    fmt = _module_format(packed.format, qcfg)
    if isinstance(old, nn.Linear):
        if tuple(old.weight.shape) != packed.shape:
            raise ModelLoadError(f"module {name!r}: quantization_config says shape {list(packed.shape)} but the "
                                 f"model's linear is {list(old.weight.shape)}")
        bias = tensors.get(name + ".bias")
        if (bias is None) != (old.bias is None):
            raise ModelLoadError(f"tensor {name + '.bias'!r}: the model's linear "
                                 f"{'has' if old.bias is not None else 'has no'} bias but the checkpoint "
                                 f"{'lacks it' if bias is None else 'stores one'}")
        new: nn.Module = QuantizedLinear(fmt, packed, None if bias is None else bias.to(dtype))
    elif isinstance(old, nn.Embedding):
        new = QuantizedEmbedding(fmt, packed, dtype)
    else:
        raise ModelLoadError(f"quantization_config lists module {name!r}, which the model "
                             f"{'lacks' if old is None else 'has as ' + type(old).__name__ + ', not a linear'}")
    swap_module(model, old, new)
    if isinstance(new, QuantizedEmbedding) and type(getattr(model, "logits_head", None)).__name__ == "TiedLMHead":
        model.logits_head = new.tied_head()


def load_quantized(folder: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build the model of a quantized folder (see module docstring)."""
    qcfg = read_quant_config(folder)
    if qcfg is None:
        raise ModelLoadError(f"{folder!r} has no {QUANT_CONFIG_FILE}; it is not a quantized checkpoint")
    if qcfg["scheme"] not in WEIGHT_FORMATS:
        raise InvalidParameterError("scheme", f"{folder}/{QUANT_CONFIG_FILE} names unknown scheme "
                                              f"{qcfg['scheme']!r}; known: {sorted(WEIGHT_FORMATS)}")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ModelLoadError(f"quantized folder {folder!r} has no {WEIGHTS_FILE}")
    with safe_open(weights, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    arch = ModelArchConfig.from_hf(hf_config)
    check_source(folder, qcfg, arch)
    model = model_class(arch.architecture)(arch, dtype)
    for name, spec in qcfg["modules"].items():
        _swap_in(model, name, _packed_for(name, spec, tensors, qcfg), tensors, dtype, qcfg)
    _load_rest(model, tensors, set(qcfg["modules"]))
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, arch=arch, hf_config=hf_config, source="quantized")


@torch.no_grad()
def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: set[str]) -> None:
    """Copy every tensor of the state dict not already placed by a swap; aliases of a placed tensor count as loaded."""
    state = model.state_dict(keep_vars=True)
    placed = {id(t) for n, t in state.items() if n.rsplit(".", 1)[0] in quantized}
    loaded: set[int] = set()
    for name, t in tensors.items():
        if name.rsplit(".", 1)[0] in quantized:
            continue
        target = state.get(name)
        if target is None:
            raise ModelLoadError(f"unexpected tensor {name!r} (shape {list(t.shape)}): the model has no such "
                                 f"parameter and no quantized module owns it")
        if tuple(t.shape) != tuple(target.shape):
            raise ModelLoadError(f"tensor {name!r} has shape {list(t.shape)} but the model expects "
                                 f"{list(target.shape)}")
        target.data.copy_(t)
        loaded.add(id(target))
    missing = [n for n, t in state.items() if id(t) not in loaded and id(t) not in placed]
    if missing:
        raise ModelLoadError(f"quantized checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing)")


def load_for_engine(path: str, dtype: torch.dtype, quantization: str | None) -> LoadedModel:
    """Load ``path`` as ``ModelConfig.quantization`` asks (see module docstring)."""
    if quantization is None:
        return load_model(path, dtype)
    is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
    qcfg = read_quant_config(path) if os.path.isdir(path) else None
    if quantization == "auto":
        if qcfg is not None:
            return load_quantized(path, dtype)
        return load_model(path, dtype, packed=is_gguf)
    if quantization not in WEIGHT_FORMATS:
        raise InvalidParameterError("quantization", f"unknown scheme {quantization!r}; known: "
                                                    f"{['auto', *sorted(WEIGHT_FORMATS)]}")
    if is_gguf:
        raise InvalidParameterError("quantization", f"a .gguf file keeps its own ggml types; use 'auto' to load "
                                                    f"it packed, not {quantization!r}")
    if qcfg is not None:
        if qcfg["scheme"] != quantization:
            raise InvalidParameterError("quantization", f"{path} is quantized with {qcfg['scheme']!r}, "
                                                        f"not {quantization!r}")
        return load_quantized(path, dtype)
    loaded = load_model(path, dtype)
    quantize_model(loaded.model, quantization)
    return loaded
