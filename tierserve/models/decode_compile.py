"""Compiled dense segments of a Llama-family decoder step (``torch.compile``, CPU inductor).

A decoder step alternates dense work (norms, projections, RoPE, MLP, residuals)
with paged attention, whose inputs (block tables, host sequence lengths) change
every step. The dense work between two attentions is compiled as one function;
attention stays eager, so the compiled code never sees the KV cache:

    q, k, v      = head(layer_0, h, cos, sin)                     input norm, qkv_proj, RoPE
    per layer i: o = attention(q, k, v)                            eager (paged)
                 h, q, k, v = middle(layer_i, layer_i+1, h, o, cos, sin)
                     = o_proj, residual, post-attention norm, gate_up, silu*up, down, residual,
                       then layer i+1's head
                 (last layer: h = tail(layer_i, final_norm, h, o))

Three compiled functions serve every layer: the layers are passed as arguments
and torch.compile lifts their weights to graph inputs, so one compilation is
shared by all 30 layers of SmolLM2 (``torch._dynamo`` recompiles only when the
token count changes: ``dynamic=None`` makes the token dimension symbolic after
its second distinct value, or when ``torch.set_num_threads`` changes: the thread
count is part of dynamo's guarded global state; dynamo allows 8 compilations per
function, so a process that keeps changing its thread count fails). Inductor fuses the float32<->bfloat16 casts around
the packed matmuls (torch's int4 kernels, or the integer-dot custom op, an extern call
either way) into the neighbouring norm, activation and residual loops,
and writes each segment's pointwise work as a few C++ loops instead of ~20
dispatched ops.

The eager forward (``DecoderLM.forward``) stays the reference: the compiled one
runs the same modules, and its hidden states differ from eager only by float
reassociation inside fused loops (tests/test_decode_compile.py bounds the
difference and checks the greedy tokens match). ``supported(model)`` limits it
to decoders whose layers take the merged-RoPE path (no q/k norm, no clipping)
with a ``GatedMLP`` and float32 RMSNorms; others keep the eager forward.

Compile cost: the first call of each function (and of each new token-count
regime) compiles; ``warm_up`` runs them once at 1 and 2 tokens so that cost is
paid at load time, before the first request (inductor caches the generated code
on disk, so a second process loads it instead of compiling).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tierserve.errors import InvalidParameterError
from tierserve.models.context import ForwardContext
from tierserve.models.decode_graph import DecodeGraph, eligible
from tierserve.models.layers import GatedMLP, RMSNorm


def _head(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return layer.self_attn._qkv_rope_merged(layer.input_layernorm(h), cos, sin)


def _rows(o: torch.Tensor) -> torch.Tensor:
    """Attention output ``[T, Hq, D]`` as ``[T, Hq*D]`` with standard strides (dynamo guards on every stride,
    even of a size-1 dimension, and the backends' outputs differ in them: one stride, no recompile)."""
    flat = o.reshape(o.shape[0], -1)
    return flat if flat.stride() == (flat.shape[1], 1) else flat.clone(memory_format=torch.contiguous_format)


def _mlp_block(layer: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    h = h + layer.self_attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _middle(layer: nn.Module, nxt: nn.Module, h: torch.Tensor, o: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor):
    h = _mlp_block(layer, h, o)
    q, k, v = _head(nxt, h, cos, sin)
    return h, q, k, v


def _tail(layer: nn.Module, norm: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    return norm(_mlp_block(layer, h, o))


def _f32_norm(norm: nn.Module) -> bool:
    return isinstance(norm, RMSNorm) and not norm.unit_offset and norm.weight.dtype == torch.float32


def supported(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder whose dense segments this file compiles (module docstring)."""
    layers = getattr(model, "layers", None)
    if layers is None or not len(layers) or not hasattr(model, "rope") or not _f32_norm(getattr(model, "norm", None)):
        return False
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "qk_norm", None) != "none" or attn.clip is not None:
            return False
        if not isinstance(layer.mlp, GatedMLP):
            return False
        if not (_f32_norm(layer.input_layernorm) and _f32_norm(layer.post_attention_layernorm)):
            return False
    return True


class CompiledDecoder:
    """The compiled segments of one model and the forward that runs them around eager attention."""

    def __init__(self, model: nn.Module, whole_step: bool = True):
        if not supported(model):
            raise ValueError(f"{type(model).__name__}: compiled decode needs Llama-style layers (decode_compile.py)")
        self.model = model
        self.head = torch.compile(_head, fullgraph=True)
        self.middle = torch.compile(_middle, fullgraph=True)
        self.tail = torch.compile(_tail, fullgraph=True)
        #: batch-1 decode steps as one graph (decode_graph.py) where the model allows it
        self.step_graph = DecodeGraph(model) if whole_step and eligible(model) else None
        self.compile_s = 0.0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.step_graph is not None and self.step_graph.takes(ctx):
            return self.step_graph.forward(input_ids, positions, ctx)
        model = self.model
        model.rope.ensure(max(ctx.attn.seq_lens))
        cos, sin = model.rope.lookup(positions, model.dtype)
        h = model.embed_tokens(input_ids)
        layers = model.layers
        last = len(layers) - 1
        q, k, v = self.head(layers[0], h, cos, sin)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            o = ctx.attn.backend.forward(q, k, v, ctx.kv_caches[i], ctx.attn, scale=attn.scale,
                                         sliding_window=attn.sliding_window, logit_softcap=attn.softcap)
            o = _rows(o)
            if i < last:
                h, q, k, v = self.middle(layer, layers[i + 1], h, o, cos, sin)
            else:
                h = self.tail(layer, model.norm, h, o)
        return h

    @torch.inference_mode()
    def warm_up(self, token_counts: tuple[int, ...] = (1, 2), block_size: int = 16) -> float:
        """Compile every segment at each token count (the second one makes the token dimension dynamic);
        returns and records the seconds spent."""
        model = self.model
        layers = model.layers
        attn = layers[0].self_attn
        t0 = time.perf_counter()
        model.rope.ensure(max(token_counts) + 1)
        for t in token_counts:
            cos, sin = model.rope.lookup(torch.arange(t), model.dtype)
            h = torch.zeros(t, model.cfg.hidden_size, dtype=model.dtype)
            o = torch.zeros(t, attn.q_size, dtype=model.dtype)
            self.head(layers[0], h, cos, sin)
            self.middle(layers[0], layers[min(1, len(layers) - 1)], h, o, cos, sin)
            self.tail(layers[-1], model.norm, h, o)
        if self.step_graph is not None:
            self.step_graph.warm_up(block_size, kv_dtype=model.dtype)
        self.compile_s += time.perf_counter() - t0
        return self.compile_s


def compile_decoder(model: nn.Module, warm_up: bool = True, whole_step: bool = True,
                    block_size: int = 16) -> CompiledDecoder:
    """Install compiled dense segments on ``model`` (and, with ``whole_step``, the batch-1 decode graph of
    decode_graph.py): its forward runs them (``DecoderLM.forward``)."""
    compiled = CompiledDecoder(model, whole_step)
    if warm_up:
        compiled.warm_up(block_size=block_size)
    model.compiled_decode = compiled
    return compiled


def compile_for_engine(model: nn.Module, device: torch.device, block_size: int = 16) -> CompiledDecoder:
    """The engine's ``compile_decode`` option: compile (and warm up) a supported decoder on the CPU, or refuse."""
    if device.type != "cpu":
        raise InvalidParameterError("compile_decode", f"runs on the CPU only, the model is on {device.type}")
    if not supported(model):
        raise InvalidParameterError("compile_decode", f"supports Llama-family decoders without q/k norm or clipping "
                                                      f"and with float32 norms, not {type(model).__name__}")
    return compile_decoder(model, block_size=block_size)
