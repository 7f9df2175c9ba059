"""Load a GGUF model packed: Q4_0 / Q4_1 / Q8_0 tensors stay in their ggml blocks, never widened.

ggml stores a 2-D weight ``[out, in]`` row by row, each row a run of blocks of
32 in-features, and the tierserve formats ``q4_0``/``q4_1``/``q8_0``
(``kernels/quant/ggml_blocks.py``) use exactly that byte layout, so a tensor's
bytes (``GGUFFile.raw_bytes``) reshaped to ``uint8 [out, row_bytes]`` *are* the
packed weight. Row-wise transforms therefore act on whole byte rows:

- llama's q/k rotary un-permutation (``hf_mapping._unpermute_rows``) permutes
  out-feature rows, i.e. byte rows; tests check that dequantizing the permuted
  bytes equals permuting the dequantized float tensor;
- fused projections (``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up) stack
  their parts' byte rows in slot order; this needs every part in the same ggml
  type, else that module is loaded widened to float (listed in the report);
- MoE expert stacks ``[E, out, in]`` give one ``[out, row_bytes]`` slice per expert.

The token embedding, when packable, becomes a ``QuantizedEmbedding`` (rows
widened on lookup); with tied embeddings the LM head is its ``tied_head()``.
Every other tensor (norms, F32/F16/K-quant weights) goes through the float
path of ``hf_mapping.iter_gguf_hf_tensors``. The model's float weights of the
packed modules are allocated uninitialised (never touched) and dropped with the
swapped-out modules; tests check that SmolLM2's Q4_1 GGUF loaded this way holds
under 35% of the fp32 model's bytes and reproduces its logits within 1e-4.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tierserve.kernels.quant.base import QuantizedLinear, get_format
from tierserve.kernels.quant.embedding import QuantizedEmbedding
from tierserve.kernels.quant.transform import linear_modules, swap_module
from tierserve.models.gguf.ggml_types import GGML_TYPES_BY_NAME
from tierserve.models.gguf.hf_mapping import (_GLOBAL_NAMES, _LAYER_RE, _arch, _unpermute_rows, gguf_to_hf_config,
                                              iter_gguf_hf_tensors)
from tierserve.models.gguf.reader import GGUFFile

PACKED_GGML_FORMATS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}


@dataclass(frozen=True)
class PackedSource:
    """Where one HF weight's packed rows come from in the GGUF file."""

    gguf_name: str
    ggml_type: str
    expert: int | None = None
    unpermute_heads: int | None = None


@dataclass
class PackedLoadReport:
    packed: dict[str, str] = field(default_factory=dict)  # module name -> format
    widened: list[str] = field(default_factory=list)      # modules with ggml-block parts loaded as float


def packed_sources(g: GGUFFile) -> dict[str, PackedSource]:
    """HF weight name -> its source, for every Q4_0/Q4_1/Q8_0 matrix (or expert stack) in ``g``."""
    _, spec = _arch(g)
    config = gguf_to_hf_config(g)
    out: dict[str, PackedSource] = {}
    for info in g.tensors:
        gtype = info.ggml_type_name
        if gtype not in PACKED_GGML_FORMATS or len(info.shape) not in (2, 3):
            continue
        if info.name in _GLOBAL_NAMES and len(info.shape) == 2:
            out[_GLOBAL_NAMES[info.name]] = PackedSource(info.name, gtype)
            continue
        m = _LAYER_RE.fullmatch(info.name)
        if m is None or m[3] != "weight":
            continue
        layer, part = m[1], m[2]
        heads = None
        if spec.permute_qk and part in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
        if part in spec.expert_names and len(info.shape) == 3:
            for e in range(info.shape[0]):
                hf = f"model.layers.{layer}.{spec.expert_names[part].format(e=e)}.weight"
                out[hf] = PackedSource(info.name, gtype, e, heads)
        elif part in spec.layer_names and len(info.shape) == 2:
            out[f"model.layers.{layer}.{spec.layer_names[part]}.weight"] = PackedSource(info.name, gtype, None, heads)
    return out


def packed_rows(g: GGUFFile, src: PackedSource) -> torch.Tensor:
    """The source's ggml block bytes as an owned ``uint8 [out, row_bytes]`` tensor, rows in HF order."""
    info = g.tensor_info(src.gguf_name)
    gtype = GGML_TYPES_BY_NAME[src.ggml_type]
    row_bytes = info.shape[-1] // gtype.block_size * gtype.type_size
    raw = g.raw_bytes(src.gguf_name)
    if src.expert is not None:
        raw = raw.reshape(info.shape[0], -1)[src.expert]
    rows = torch.from_numpy(np.array(raw, copy=True)).reshape(-1, row_bytes)
    return _unpermute_rows(rows, src.unpermute_heads) if src.unpermute_heads else rows


def _plan(model: nn.Module, sources: dict[str, PackedSource]) -> tuple[dict[str, list[str]], list[str]]:
    """Linear module name -> its HF part names in row order, for modules whose every part is packable."""
    by_param: dict[int, list[tuple[int, str]]] = {}
    for hf, slot in model.hf_slots().items():
        by_param.setdefault(id(slot.param), []).append((slot.start, hf))
    plan, widened = {}, []
    for name, lin in linear_modules(model).items():
        parts = [hf for _, hf in sorted(by_param.get(id(lin.weight), []))]
        types = {sources[hf].ggml_type if hf in sources else None for hf in parts}
        if parts and len(types) == 1 and None not in types:
            plan[name] = parts
        elif types - {None}:
            widened.append(name)
    return plan, widened


@torch.no_grad()
def _load_float(model: nn.Module, g: GGUFFile, skip_hf: set[str], sources: dict[str, PackedSource]) -> None:
    """Fill every slot except ``skip_hf`` (already packed) through ``CausalLMBase.load_weights``."""
    skip_gguf = {s.gguf_name for hf, s in sources.items() if hf in skip_hf}
    rest = dataclasses.replace(g, tensors=[t for t in g.tensors if t.name not in skip_gguf])
    model.load_weights(iter_gguf_hf_tensors(rest), filled=skip_hf)


def load_gguf_packed(model: nn.Module, g: GGUFFile) -> PackedLoadReport:
    """Fill ``model`` from ``g`` keeping Q4_0/Q4_1/Q8_0 matrices packed (see module docstring)."""
    sources = packed_sources(g)
    plan, widened = _plan(model, sources)
    embed_hf = "model.embed_tokens.weight"
    pack_embed = embed_hf in sources and isinstance(getattr(model, "embed_tokens", None), nn.Embedding)
    skip_hf = {hf for parts in plan.values() for hf in parts} | ({embed_hf} if pack_embed else set())
    _load_float(model, g, skip_hf, sources)
    report = PackedLoadReport(widened=widened)
    modules = linear_modules(model)
    for name, parts in plan.items():
        lin = modules[name]
        fmt = get_format(PACKED_GGML_FORMATS[sources[parts[0]].ggml_type])
        blocks = torch.cat([packed_rows(g, sources[hf]) for hf in parts]) if len(parts) > 1 \
            else packed_rows(g, sources[parts[0]])
        packed = fmt.from_blocks(blocks, tuple(lin.weight.shape), parts[0])
        swap_module(model, lin, QuantizedLinear(fmt, packed, None if lin.bias is None else lin.bias.detach()))
        report.packed[name] = fmt.name
    if pack_embed:
        fmt = get_format(PACKED_GGML_FORMATS[sources[embed_hf].ggml_type])
        emb = QuantizedEmbedding(fmt, fmt.from_blocks(packed_rows(g, sources[embed_hf]),
                                                      tuple(model.embed_tokens.weight.shape), embed_hf), model.dtype)
        tied = model.lm_head is None
        model.embed_tokens = emb
        report.packed["embed_tokens"] = fmt.name
        if tied:
            model.logits_head = emb.tied_head()
    return report
