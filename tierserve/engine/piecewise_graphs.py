"""PiecewiseGraphs: decode of MoE and expert-offload models as CUDA graphs between the expert dispatches.

A MoE block synchronises with the host in its forward (routing sizes each
expert's batch with ``bincount(...).tolist()``; the expert-offload block also
plans its fused host messages, copies rows to pinned buffers and waits for the
hosts), so a whole decode step cannot be one CUDA graph. As vLLM's piecewise
graphs do around non-capturable ops, the forward is cut at every MoE block and
the pieces between two blocks are captured; the blocks run eagerly.

Segment plan (``plan_segments``, pure bookkeeping over layer indices). For a
``DecoderLM`` of ``L`` layers whose MoE layers are ``m_0 < m_1 < ... < m_{K-1}``
(``boundary_layers``: the layers whose ``mlp`` is not graph-capturable,
models/base.py ``graph_capturable``) there are ``K + 1`` segments:

    segment 0:  rope lookup, embed_tokens, layers 0..m_0-1 whole,
                layer m_0's input_layernorm, self_attn, residual, post_attention_layernorm
    boundary j: y = layers[m_j].mlp(x[:n])                       eager, real rows only
    segment j:  h = h + y (layer m_{j-1}'s residual), layers m_{j-1}+1..m_j-1 whole,
                layer m_j's attention half as above                (1 <= j < K)
    segment K:  h = h + y, layers m_{K-1}+1..L-1 whole, final norm, logits

The router runs with its block, eagerly: both block types compute ``route(x)`` inside
their forward, and ``route`` is where usage recorders and routing traces attach
(tierserve/offload/usage_hook.py), which must see every step (a replayed graph
runs no Python). It is one ``[n, hidden] x [hidden, E]`` GEMM, softmax and top-k
per layer next to the dispatch's own host work.

Each op is the one ``DecoderLayer.forward`` / ``DecoderLM.forward_eager`` runs, in
the same order, so the segmented forward run eagerly equals the model's forward
bit for bit (tests/test_piecewise_graphs.py, CPU, with and without offload).

Static buffers (one set, shared by all boundaries: the segments run in order and
each boundary's values are consumed before the next segment overwrites them):
``h`` (the residual stream), ``x`` (the MoE block's input), ``y`` (its output) of
``[top bucket, hidden]`` in the model's dtype, and ``cos``/``sin`` written by
segment 0 and read by all. A segment reads ``h``/``y`` and writes ``h``/``x`` by
copy, so every captured graph's inputs and outputs live outside its memory pool.
The step's inputs (token ids, positions, slots, block-table rows, sequence
lengths) and the padding-row scheme are ``DecodeGraphs``' (engine/cuda_graphs.py):
buckets ``graph_buckets``, padding rows on the scratch KV page with length 1.

Padding rows at a boundary: only the ``n`` real rows go to the MoE block
(``x[:n]``). Padding rows are never routed, so they send no rows to an expert
host, count no expert usage, never make an expert's batch larger than the eager
step's, and every real row's expert output is that of an eager step of ``n``
rows. ``y``'s padding rows are zeroed once per step; what the dense segments
compute on them is discarded (row-wise ops: it never reaches a real row).

Capture (CUDA): each segment of every bucket runs once eagerly (triton compiles,
RoPE tables at ``max_model_len``; the MoE blocks are NOT run, so warm-up records
no expert usage and sends nothing to the hosts), then each bucket's segments are
captured, largest bucket first and segments in order, into one shared memory
pool. Before ``capture()`` (or without it, on the CPU) ``run`` executes the same
buffers and segments eagerly with the true host sequence lengths: the path the
CPU tests check, and a reference for the captured one.

Selection (``decode_graph_mode``): "full" (``DecodeGraphs``) for a model whose
whole forward is capturable, "piecewise" for a ``DecoderLM`` of plain
``DecoderLayer`` s whose only non-capturable modules are MoE blocks (resident or
offloaded), None otherwise (e.g. a compiled CPU decoder).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tierserve.engine.cuda_graphs import DecodeGraphs
from tierserve.errors import InvalidParameterError
from tierserve.models.base import graph_capturable
from tierserve.models.llama import DecoderLayer, DecoderLM


@dataclass(frozen=True)
class Segment:
    """One captured piece: ``resume`` (the MoE layer whose output starts it; None: the embedding), the layers
    it runs whole, and ``stop`` (the layer whose attention half ends it before its MoE block; None: logits)."""

    index: int
    resume: int | None
    layers: tuple[int, ...]
    stop: int | None

    def modules(self) -> list[str]:
        """The model's submodules this segment runs, in order (``+`` names a residual add of a boundary)."""
        names = ["rope", "embed_tokens"] if self.resume is None else [f"+layers.{self.resume}.mlp"]
        names += [f"layers.{i}" for i in self.layers]
        if self.stop is None:
            return names + ["norm", "logits_head"]
        p = f"layers.{self.stop}."
        return names + [p + "input_layernorm", p + "self_attn", p + "post_attention_layernorm"]

    @property
    def boundary(self) -> str | None:
        """The eager module after this segment (None for the last)."""
        return None if self.stop is None else f"layers.{self.stop}.mlp"


def plan_segments(num_layers: int, boundaries: Iterable[int]) -> list[Segment]:
    """The segments of a ``num_layers`` decoder cut at the MoE layers ``boundaries`` (module doc)."""
    cuts = sorted(set(boundaries))
    if num_layers < 1:
        raise InvalidParameterError("num_layers", f"must be >= 1, got {num_layers}")
    bad = [c for c in cuts if not 0 <= c < num_layers]
    if bad:
        raise InvalidParameterError("boundaries", f"layer {bad[0]} is outside [0, {num_layers})")
    segments, prev = [], None
    for stop in [*cuts, None]:
        first = 0 if prev is None else prev + 1
        last = num_layers if stop is None else stop
        segments.append(Segment(len(segments), prev, tuple(range(first, last)), stop))
        prev = stop
    return segments


def boundary_layers(model: torch.nn.Module) -> list[int]:
    """Layers whose ``mlp`` holds a module that is not graph-capturable (a MoE block), ascending."""
    return [i for i, layer in enumerate(model.layers) if not all(graph_capturable(m) for m in layer.mlp.modules())]


def piecewise_supported(model: torch.nn.Module) -> bool:
    """A ``DecoderLM`` of plain ``DecoderLayer`` s, no compiled decode installed, at least one MoE layer, and
    every non-capturable module inside a boundary layer's ``mlp``."""
    if not isinstance(model, DecoderLM) or "compiled_decode" in model.__dict__:
        return False
    if any(type(layer) is not DecoderLayer for layer in model.layers):
        return False
    cuts = boundary_layers(model)
    inside = {id(m) for i in cuts for m in model.layers[i].mlp.modules()}
    return bool(cuts) and all(graph_capturable(m) for m in model.modules() if id(m) not in inside)


def decode_graph_mode(model: torch.nn.Module) -> str | None:
    """"full", "piecewise" or None: which decode graphs ``model`` gets (module doc)."""
    if model.supports_cuda_graphs():
        return "full"
    return "piecewise" if piecewise_supported(model) else None


class SegmentBuffers:
    """The static hidden-state buffers of the boundaries and the segments that read and write them."""

    def __init__(self, model: DecoderLM, top: int, device: torch.device):
        self.model = model
        hidden, dtype = model.cfg.hidden_size, model.dtype
        self.h = torch.zeros(top, hidden, dtype=dtype, device=device)
        self.x = torch.zeros(top, hidden, dtype=dtype, device=device)
        self.y = torch.zeros(top, hidden, dtype=dtype, device=device)
        model.rope.ensure(1)  # the tables exist (their length does not matter here)
        cos, sin = model.rope.lookup(torch.zeros(top, dtype=torch.long, device=device), dtype)
        self.cos, self.sin = torch.zeros_like(cos), torch.zeros_like(sin)

    def segment(self, seg: Segment, batch: int, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx) -> torch.Tensor | None:
        """Run ``seg`` on the first ``batch`` rows; the last segment returns the logits, the others None."""
        model = self.model
        cos, sin = self.cos[:batch], self.sin[:batch]
        if seg.resume is None:
            c, s = model.rope.lookup(positions, model.dtype)
            cos.copy_(c)
            sin.copy_(s)
            h = model.embed_tokens(input_ids)
        else:
            h = self.h[:batch] + self.y[:batch]
        for i in seg.layers:
            h = model.layers[i](h, cos, sin, ctx)
        if seg.stop is None:
            return model.compute_logits(model.norm(h))
        layer = model.layers[seg.stop]
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, ctx)
        self.h[:batch].copy_(h)
        self.x[:batch].copy_(layer.post_attention_layernorm(h))
        return None

    def boundary(self, seg: Segment, n: int) -> None:
        """The eager MoE block after ``seg`` on the ``n`` real rows."""
        self.y[:n].copy_(self.model.layers[seg.stop].mlp(self.x[:n]))


class PiecewiseGraphs(DecodeGraphs):
    """Decode steps of a MoE model: captured segments per bucket, eager MoE blocks between (module doc)."""

    def __init__(self, model, kv_caches, attention, block_size: int, max_blocks_per_seq: int, max_model_len: int,
                 scratch_block: int, max_num_seqs: int, device: torch.device, max_batch: int = 128):
        super().__init__(model, kv_caches, attention, block_size, max_blocks_per_seq, max_model_len, scratch_block,
                         max_num_seqs, device, max_batch)
        if not piecewise_supported(model):
            raise InvalidParameterError("model", f"{type(model).__name__} has no piecewise decode plan "
                                                 f"(piecewise_graphs.py: DecoderLayer stacks with MoE blocks)")
        self.plan = plan_segments(len(model.layers), boundary_layers(model))
        self.buffers = SegmentBuffers(model, self.buckets[-1], self.device)
        self.captured = False
        self._seg_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _segment(self, seg: Segment, batch: int, host_seq_lens: list[int] | None = None):
        return self.buffers.segment(seg, batch, self.input_ids[:batch], self.positions[:batch],
                                    self.context(batch, host_seq_lens))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up every segment of every bucket eagerly (no MoE block runs), then capture them, largest
        bucket first, segments in order, into one memory pool."""
        self.model.rope.ensure(self.max_model_len)
        for batch in self.buckets:
            for seg in self.plan:
                self._segment(seg, batch)
        torch.cuda.synchronize(self.device)
        for batch in reversed(self.buckets):
            for seg in self.plan:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._segment(seg, batch)
                if self.pool is None:
                    self.pool = graph.pool()
                self._seg_graphs[(batch, seg.index)] = graph
                if out is not None:
                    self._logits[batch] = out
        self._reset_padding_rows(0, self.buckets[-1])
        self.captured = True

    @torch.inference_mode()
    def run(self, step, device_table: torch.Tensor) -> torch.Tensor:
        """One decode-only step: segments replayed (or run eagerly before ``capture``), MoE blocks eager on the
        real rows; logits ``[n, vocab]``."""
        n, batch = self.load(step, device_table)
        buf = self.buffers
        if batch > n:
            buf.y[n:batch].zero_()
        host_lens = None
        if not self.captured:  # eager: the true lengths (the torch backend sizes attention from them)
            host_lens = list(step.seq_lens) + [1] * (batch - n)
            self.model.rope.ensure(max(host_lens))
        logits = None
        for seg in self.plan:
            if self.captured:
                self._seg_graphs[(batch, seg.index)].replay()
            else:
                logits = self._segment(seg, batch, host_lens)
            if seg.stop is not None:
                buf.boundary(seg, n)
        if self.captured:
            logits = self._logits[batch]
        return logits[:n].clone()
