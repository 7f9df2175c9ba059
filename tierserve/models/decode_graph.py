"""A whole batch-1 decode step as one compiled graph (``torch.compile``, CPU inductor, C++ wrapper).

The compiled segments of ``decode_compile.py`` still leave each layer's attention
eager and call three compiled functions per layer from Python: on a 2-core host a
SmolLM2 step is then ~40% Python and dispatch. For the commonest CPU step, one
sequence decoding one token over plain paged KV, this file compiles the whole
step, every layer with its paged attention, into one graph:

    inputs: token id [1], position [1], flat slot [1] (block * block_size + offset),
            the sequence's block ids [nb], context length L, every layer's K and V pages
    cos, sin = RoPE tables at the position
    h = embed(id)
    per layer:  x = input_norm(h);  q, k, v = split(qkv_proj(x));  q, k = RoPE(q, k)
                K[slot] = k;  V[slot] = v                                  (in place, as LayerKV.write)
                keys, vals = the pages of the block ids, flattened, cut to L (all visible: one query at L - 1)
                s = scale * (q_g . keys)  per KV head h and query head g of its group;  p = softmax(s)
                o = p . vals;  h = h + o_proj(o);  h = h + mlp(post_norm(h))
    return norm(h)

The eager forward (``DecoderLM.forward_eager``) stays the reference: the same modules,
the same order of operations; the graph differs from it only by float reassociation
inside fused loops and in the two small attention products (tests bound the hidden
states, check the pages written and the greedy tokens).

Shapes: ``dynamic=True`` makes the context length, the block count and the pages'
block count symbolic from the first compilation, so one graph serves every length
(dynamo specialises sizes 0 and 1, so the warm-up compiles on scratch pages at two
blocks and ``block_size + 1`` tokens). ``cpp_wrapper``: inductor writes the code
that calls the fused loops and the packed matmul kernels as C++, not Python, so a step is one
Python call. The K/V pages are graph inputs mutated in place (``index_copy_``); the
graph writes them where they are (tests: the runner's own page tensors hold the
written keys and values after each step).

Guards: dynamo checks, before every call, that each input still matches what the
graph was compiled for; over the model's parameters, buffers and module
attributes that check cost 0.7-1.3 ms a step (of 7-10 ms for the graph call, SmolLM2 packed,
2 threads; benchmarks/decode_ab.py ``--revs``: batch-1 decode 76.8 -> 97.0 tok/s, paired 1.13x). The graph skips the guards on
the model's modules (``skip_guard_on_all_nn_modules_unsafe``) and keeps those on
the step's own inputs (ids, positions, slot, block ids, length, pages) and the
global state (thread count). Each ``DecodeGraph`` compiles its own copy of the step
function (dynamo keeps compiled code per code object), so the graphs of two models in
one process never stand in for each other. Sound because the compiled model is never restructured
after load: its weights are read by the graph on every call (an in-place update is
seen), no module is replaced after ``compile_decode`` installs the graph. The one
attribute that does change is the RoPE table (``rope.ensure`` replaces it by a
longer one): the graph is compiled against the table's length at its first call (the warm-up), and a step
whose sequence reaches past it is not taken (``takes``); rows below that length are
the same in any longer table.

Eligible steps (``takes``): decode-only, one sequence, within the RoPE table compiled
against, plain ``LayerKV`` pages (not a compressed format's), the torch attention
backend, no draft-tree mask; and the model (``eligible``): ``decode_compile.supported``
and no layer with a sliding window or soft-capping. Every other step runs the compiled
segments (or eager).

Measured (SmolLM2-135M, the Q4_1 GGUF kept packed, 2 threads, contexts 140-240,
forward + LM head per step, medians): eager forward 16.4 ms, this graph with the
Python wrapper 14.6 ms, with the C++ wrapper 9.8 ms. Compile cost: ~130 s the first
time for SmolLM2's 30 layers with the C++ wrapper (~65 s without); inductor caches
the generated code on disk, so a later process loads it.
"""

from __future__ import annotations

import time
import types

import torch
from torch import nn

from tierserve.kernels.kv_pages import LayerKV
from tierserve.models.context import ForwardContext
from tierserve.models.rope import apply_rope_full


def eligible(model: nn.Module) -> bool:
    """Whether the whole-step graph covers ``model`` (module docstring); needs ``decode_compile.supported``."""
    return all(layer.self_attn.sliding_window is None and layer.self_attn.softcap is None for layer in model.layers)


def _attend_one(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, flat: torch.Tensor,
                length: torch.Tensor, scale: float) -> torch.Tensor:
    """One query ``q [Hq, D]`` over the keys of the pages ``flat`` before ``length`` (a ``[1]`` tensor: no int
    input, so no recompilation per length); returns ``[1, Hq * D]``."""
    kv_heads, dim = k_pages.shape[2], k_pages.shape[3]
    keys = torch.index_select(k_pages, 0, flat).flatten(0, 1)  # [nb * bs, Hkv, D]
    vals = torch.index_select(v_pages, 0, flat).flatten(0, 1)
    qg = q.reshape(kv_heads, -1, dim)  # query head h*G + g reads KV head h (GQA)
    s = torch.einsum("hgd,lhd->hgl", qg, keys) * scale
    hidden = torch.arange(keys.shape[0], device=keys.device) >= length  # keys past the context (padding blocks)
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)  # exp(-inf) = 0: the sum over the context
    return torch.einsum("hgl,lhd->hgd", p, vals).reshape(1, -1)


def _step(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
          flat: torch.Tensor, length: torch.Tensor, pages: list[torch.Tensor]) -> torch.Tensor:
    """The graph (module docstring): ``pages`` is ``[K_0, V_0, K_1, V_1, ...]``."""
    cos = model.rope.cos_table[positions][:, None, :].to(model.dtype)
    sin = model.rope.sin_table[positions][:, None, :].to(model.dtype)
    cos_full, sin_signed = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    h = model.embed_tokens(input_ids)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qkv = attn.qkv_proj(layer.input_layernorm(h))
        qk = apply_rope_full(qkv[:, :attn.q_size + attn.kv_size].reshape(1, heads + kv_heads, dim), cos_full,
                             sin_signed)
        k_pages, v_pages = pages[2 * i], pages[2 * i + 1]
        # index_put_, not index_copy_: inductor's index_copy decomposition pins the pages' block count
        k_pages.flatten(0, 1).index_put_((slot,), qk[:, heads:].to(k_pages.dtype))
        v_pages.flatten(0, 1).index_put_(
            (slot,), qkv[:, attn.q_size + attn.kv_size:].reshape(1, kv_heads, dim).to(v_pages.dtype))
        o = _attend_one(qk[0, :heads], k_pages, v_pages, flat, length, attn.scale)
        h = h + attn.o_proj(o.to(h.dtype))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h)


class DecodeGraph:
    """The compiled whole-step graph of one model and the test for the steps it takes."""

    def __init__(self, model: nn.Module):
        if not eligible(model):
            raise ValueError(f"{type(model).__name__}: the decode graph needs layers without sliding windows "
                             f"or soft-capping (decode_graph.py)")
        self.model = model
        # a copy of ``_step`` with its own code object: dynamo keeps its compiled entries on the code object, and
        # with the module guards skipped one model's entry would otherwise serve another model's graph
        step = types.FunctionType(_step.__code__.replace(), _step.__globals__, _step.__name__)
        self.graph = torch.compile(step, fullgraph=True, dynamic=False,
                                   options={"cpp_wrapper": True,
                                            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        #: positions the RoPE table covered when the graph was compiled (set by its first call)
        self.rope_positions: int | None = None
        self.compile_s = 0.0
        self.steps = 0  # steps run through the graph (warm-up excluded)
        self._marked: set[int] = set()  # page tensors whose block count is marked symbolic
        with torch.inference_mode(False):  # ``_inputs``: normal tensors
            self._ids, self._pos, self._slot, self._len = (torch.zeros(1, dtype=torch.long) for _ in range(4))
            self._flat = torch.zeros(64, dtype=torch.long)

    def takes(self, ctx: ForwardContext) -> bool:
        """Whether this step is one the graph runs (module docstring, Eligible steps)."""
        meta = ctx.attn
        return (len(meta.seq_lens) == 1 and meta.decode_only and meta.tree_bits is None
                and (self.rope_positions is None or meta.seq_lens[0] <= self.rope_positions)
                and getattr(meta.backend, "name", "torch") == "torch" and type(ctx.kv_caches[0]) is LayerKV)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        meta = ctx.attn
        length = meta.seq_lens[0]
        self.model.rope.ensure(length)
        _, flat = meta.decode_table()
        self.steps += 1
        return self._call(input_ids, positions, meta.slot_mapping, flat, length,
                          [t for kv in ctx.kv_caches for t in (kv.k, kv.v)])

    def _call(self, input_ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, flat: torch.Tensor,
              length: int, pages: list[torch.Tensor]) -> torch.Tensor:
        """Copy the step's small inputs into the graph's own buffers and run it. Dynamo guards each input's
        dispatch keys, and a tensor allocated in inference mode has other keys than a normal one: the callers'
        tensors come either way (the engine's preallocated buffers, a test's fresh ones), the buffers are always
        normal tensors (allocated outside inference mode), so one compilation serves every caller. The block
        ids are padded to at least two (repeating the last: those keys are past ``length``), since dynamo
        specialises a size of 1; the block counts of the ids and of the pages are marked symbolic, the rest of
        every shape is static."""
        nb = max(flat.shape[0], 2)
        if self._flat.shape[0] < nb:
            with torch.inference_mode(False):
                self._flat = torch.zeros(max(nb, 2 * self._flat.shape[0]), dtype=torch.long)
        ids = self._flat[:nb]
        ids[:flat.shape[0]].copy_(flat)
        if flat.shape[0] < nb:
            ids[flat.shape[0]:].fill_(int(flat[-1]))
        torch._dynamo.mark_dynamic(ids, 0)
        for t in pages:
            if id(t) not in self._marked:
                torch._dynamo.mark_dynamic(t, 0)
                self._marked.add(id(t))
        self._ids.copy_(input_ids)
        self._pos.copy_(positions)
        self._slot.copy_(slot)
        self._len.fill_(length)
        if self.rope_positions is None:  # the graph compiles now, against this table (module docstring, Guards)
            self.rope_positions = int(self.model.rope.cos_table.shape[0])
        return self.graph(self.model, self._ids, self._pos, self._slot, ids, self._len, pages)

    def warm_up(self, block_size: int, kv_dtype: torch.dtype) -> float:
        """Compile on scratch pages (normal tensors, as the engine's, of the engine's block size; three blocks
        and ``block_size + 1`` tokens); returns and records the seconds spent."""
        model = self.model
        attn = model.layers[0].self_attn
        t0 = time.perf_counter()
        with torch.inference_mode(False):
            shape = (3, block_size, attn.num_kv_heads, attn.head_dim)
            pages = [torch.zeros(shape, dtype=kv_dtype) for _ in range(2 * len(model.layers))]
        length = block_size + 1
        model.rope.ensure(length)
        with torch.inference_mode():
            self._call(torch.zeros(1, dtype=torch.long), torch.tensor([length - 1]), torch.tensor([length - 1]),
                       torch.tensor([0, 1]), length, pages)
        self._marked.clear()
        self.compile_s += time.perf_counter() - t0
        return self.compile_s
